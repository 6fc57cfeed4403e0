"""Is a worker on this host? The token a worker advertises and the client's decision.

A worker publishes (in its registration) the host's boot id, its network namespace inode and
the paths of its index and tier files. A client short-circuits only when its own boot id and
network namespace match: host names and addresses are easy to get wrong (containers, NAT,
`--host-id`), a boot id is not. The namespace is part of it because a path means the same file
only to processes that share a mount view, and a shared network namespace is the practical
sign of that (Kubernetes pods on one node need hostNetwork on both; the cluster tests emulate
hosts with namespaces and so keep using the RPC).
"""

from __future__ import annotations

import functools
import os

BOOT_ID = "/proc/sys/kernel/random/boot_id"


@functools.cache
def host_identity() -> dict:
    """This process's {"boot_id", "netns"}; empty values when /proc does not tell."""
    try:
        with open(BOOT_ID) as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return {"boot_id": boot_id, "netns": netns}


def make_token(index_dir: str, tiers: dict[str, str]) -> dict:
    """A worker's locality token: where its files are, and on which host they are."""
    return {**host_identity(), "index": index_dir, "tiers": dict(tiers)}


def is_local(token: dict | None, mine: dict) -> bool:
    """Whether a worker's token names files on this host, as seen from this process.

    Pure; unknown identities (an empty boot id, netns 0) never match, so a /proc that does not
    answer means the RPC, not a guess.
    """
    if not isinstance(token, dict) or not mine.get("boot_id") or not mine.get("netns"):
        return False
    tiers = token.get("tiers")
    return (
        token.get("boot_id") == mine["boot_id"]
        and token.get("netns") == mine["netns"]
        and isinstance(token.get("index"), str)
        and isinstance(tiers, dict)
        and bool(tiers)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in tiers.items())
    )
