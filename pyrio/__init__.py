"""pyrio: a Kubernetes CRI runtime built from cooperating daemons."""

__version__ = "0.1.0"
