"""greupd: a declarative, self-healing GRE tunnel supervisor."""

__version__ = "0.1.0"
