"""Simulated SEV hypervisor hosts. Other machines, as far as the console knows: reached over SSH and QMP only."""
