"""Node samplers of the agent: GPU (NVML, amdsmi/rocm-smi) and NIC (netdev, InfiniBand).

One sampler per module behind one small interface (:mod:`.base`), run each round by
:mod:`.runner`; the network samplers read sysfs through :mod:`.sysfs`. Each is
switched by ``--sampler.<name>``, and :mod:`.registry` is the entry point for the
agent's command line. No GPU library is imported until its sampler runs.
"""
