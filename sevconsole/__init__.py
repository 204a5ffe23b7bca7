"""sevconsole: live migration of AMD SEV confidential VMs, from a terminal."""

__version__ = "0.1.0"
