"""Who may do what: the ACL authorizer (``authorizer``) and the audit log (``audit``)."""
