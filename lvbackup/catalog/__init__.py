"""The catalog (`catalog`: backup records in SQLite, their lifecycle enforced) and the
policies over its records, pure functions of the records they are given: `lineage` (the
parent of an incremental) and `retention` (what a `--keep-*` policy keeps).
"""
