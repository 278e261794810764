"""Gossip membership and discovery for netloader (SWIM + Lifeguard over ZeroMQ).

    from mesh import MeshAgent
    agent = MeshAgent(bind="0.0.0.0:7946", seeds=["host:7946"], secret_file="/etc/netloader/secret")
    agent.start(); agent.advertise({...}); agent.members(); agent.stop()
"""

__all__ = ["MeshAgent", "Member", "ProtocolConfig", "load_cluster_keys"]


def __getattr__(name):  # imported lazily so `import mesh.codec` stays light
    if name == "MeshAgent":
        from .api import MeshAgent

        return MeshAgent
    if name == "Member":
        from .member import Member

        return Member
    if name == "ProtocolConfig":
        from .config import ProtocolConfig

        return ProtocolConfig
    if name == "load_cluster_keys":
        from .security import load_cluster_keys

        return load_cluster_keys
    raise AttributeError(name)
