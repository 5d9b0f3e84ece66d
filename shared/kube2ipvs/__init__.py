"""kube2ipvs shared library: model, config schema, planners, renderers and the operator CLI."""

__version__ = "0.1.0"
