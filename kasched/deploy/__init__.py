"""Deployments: the workflow that puts an environment on nodes, and puts the reference one back."""
