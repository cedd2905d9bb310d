"""The Kafka wire protocol: the API dispatch table and one handler module per API family."""
