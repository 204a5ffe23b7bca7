"""Reaching hosts: inventory, SSH, discovery, the remote helper and QMP over SSH."""
