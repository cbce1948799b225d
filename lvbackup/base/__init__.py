"""The leaves: what every layer above may use and that imports nothing above it.

Exit statuses and errors (`errors`), the one subprocess runner (`proc`), file creation and
direct I/O (`diskio`, `permissions`), locks, the reserve kept for a full disk, SQLite file
errors shared by the catalog and the index cache (`sqlitefile`), the backup lifecycle,
labels, secret variables, crash points (`faults`), times and sizes (`timeutil`, `units`).
"""
