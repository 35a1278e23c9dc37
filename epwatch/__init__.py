"""epwatch: find the straggler in a Wide-EP MoE serving cluster and say why it is slow."""

__version__ = "0.1.0"
