cd /tmp
for i in 1 2 3; do /usr/bin/time -f "pass %e s (user %U sys %S)" /work/main/.venv/bin/python -c pass; done
for i in 1 2; do /usr/bin/time -f "pass -S %e s (user %U sys %S)" /work/main/.venv/bin/python -S -c pass; done
for i in 1 2; do /usr/bin/time -f "cli %e s (user %U sys %S)" /work/main/.venv/bin/python -c 'import lvbackup.cli'; done
for i in 1 2; do /usr/bin/time -f "sqlite_utils %e s (user %U sys %S)" /work/main/.venv/bin/python -c 'import sqlite_utils'; done
/usr/bin/time -f "sha 48M %e s" sha256sum /work/main/.venv/bin/python >/dev/null
/usr/bin/time -f "loop %e s" /work/main/.venv/bin/python -c 'sum(range(10**7))'
