"""Security: who a client is (listeners and their security protocols, TLS, SASL, SCRAM
credentials) and what it may do (the ACL authorizer, ``authorizer``; the audit log, ``audit``)."""
