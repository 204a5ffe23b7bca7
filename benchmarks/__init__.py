"""Benchmarks that print measured figures as JSON; run from the repository root:
`python -m benchmarks.NAME` (the checkout's sevconsole and tests packages are importable then)."""
