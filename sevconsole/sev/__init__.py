"""The pure SEV domain: formats, policy, crypto and the firmware model. No I/O, no project imports."""
