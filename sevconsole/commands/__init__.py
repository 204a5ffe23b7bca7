"""Headless sub-commands of the `sevconsole` command line."""
