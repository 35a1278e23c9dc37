"""The per-node agent and the hooks a serving engine imports.

Nothing here imports the collector or pandas: the agent daemon runs with numpy,
protobuf and grpcio only.
"""
