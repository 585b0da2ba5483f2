"""greupd's standing hostile-input campaign: coverage-guided fuzzing (atheris, libFuzzer for Python) of every
parser that reads bytes greupd did not write.

    fuzz/targets.py   the harnesses: one function per target, bytes in, the target's documented errors caught,
                      any other exception (or a broken property, as AssertionError) escapes: a crash
    fuzz/findings.py  a crash's signature, and its reproducer saved under fuzz/crashes/<target>/
    fuzz/worker.py    one target under atheris (a subprocess of the runner)
    fuzz/cover.py     one target's corpus replayed under coverage.py: line coverage of its modules
    fuzz/seeds.py     builds the committed seed corpus fuzz/corpus/<target>/ (scapy packets, netlink dumps of
                      this host's kernel, VICI messages, requests, the repository's configs and import files)
    fuzz/__main__.py  `python -m fuzz` (= `make fuzz`): every target for its time, then the table

RELIABILITY.md, "Fuzzing", says why atheris, what each target's documented errors are, and the figures.
"""
