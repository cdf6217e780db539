"""The guest's network: none (the default: no NIC at all) or NAT through QEMU's user-mode stack.

User-mode NAT (slirp) needs no root, no TAP and no host routing changes; the guest sees a private
10.0.2.0/24 where 10.0.2.2 is the host's loopback and 10.0.2.3 forwards DNS to the host's
resolver. The agent configures eth0 from the plan's GuestNetwork, so the guest needs no DHCP client.
"""

from dataclasses import dataclass

from bencher_runner.sandbox.agentconfig import GuestNetwork

USER_NAT_GUEST = GuestNetwork(address="10.0.2.15/24", gateway="10.0.2.2", dns="10.0.2.3")
HOST_FROM_GUEST = "10.0.2.2"  # how a guest on user-mode NAT reaches the host's 127.0.0.1


@dataclass(frozen=True)
class NetworkPlan:
    qemu_args: tuple[str, ...]
    guest: GuestNetwork


def user_nat() -> NetworkPlan:
    netdev = "user,id=net0,ipv6=off,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3"
    args = ("-netdev", netdev, "-device", "virtio-net-device,netdev=net0")
    return NetworkPlan(qemu_args=args, guest=USER_NAT_GUEST)
