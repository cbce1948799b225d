"""One module per operation (create, restore, delete, verify, prune, copy, ...): each
takes what it works on (mostly a Session) and returns records or reports for the CLI, or
any other caller, to render."""
