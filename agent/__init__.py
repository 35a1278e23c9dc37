"""The per-node agent and the hooks a serving engine imports.

Nothing here imports the collector: the agent daemon runs with numpy,
protobuf and grpcio only.
"""
