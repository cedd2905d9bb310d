"""The schema registry, and the broker-side validation of produced records against it."""
