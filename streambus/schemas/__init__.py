"""The schema registry, and the broker-side validation of produced records against it.

``registry`` holds the registry's operations, ``store`` its in-memory state, ``storage``
its records in the ``_schemas`` topic, ``formats`` (with ``json_format`` and
``protobuf_format``) each format's parsing and rules, ``compatibility`` the levels,
``rest`` the HTTP API; ``validation`` checks produced records. Nothing is imported here:
``streambus.partitions`` imports ``validation``, and the registry imports the partitions.
"""
