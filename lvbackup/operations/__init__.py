"""One module per operation; each takes a Session and returns records or reports for
the CLI (or any other caller) to render."""
