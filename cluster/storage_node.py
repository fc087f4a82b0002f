"""A storage process: mounts a segment of memory in the Mooncake cluster and stays up until signalled.

    python -m tq_mooncake.cluster.storage_node --master 127.0.0.1:50051 --metadata P2PHANDSHAKE --segment 256MB

Prints ``READY <segment-name>`` on stdout once the segment is mounted; on SIGTERM or SIGINT it closes the
store (unmounting the segment: data with no other replica is dropped) and exits 0. Killing it with
SIGKILL leaves the master to notice after ``--client_ttl`` seconds, like a crashed node.
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master", default="127.0.0.1:50051", help="master RPC address host:port")
    parser.add_argument("--metadata", default="P2PHANDSHAKE", help="metadata server (URL or P2PHANDSHAKE)")
    parser.add_argument("--host", default="127.0.0.1", help="the address this node advertises")
    parser.add_argument("--segment", default="256MB", help="memory contributed to the cluster")
    parser.add_argument("--protocol", default="tcp")
    parser.add_argument("--device", default="")
    args = parser.parse_args(argv)

    # Imported once the arguments are known: --help answers without loading the client (and torch).
    from tq_mooncake.client.config import ClientConfig, normalize_metadata_server, parse_size
    from tq_mooncake.client.store import connect_store

    config = ClientConfig(
        local_hostname=args.host,
        metadata_server=normalize_metadata_server(args.metadata),
        master_server_address=args.master,
        protocol=args.protocol,
        device_name=args.device,
        global_segment_size=parse_size("--segment", args.segment),
        local_buffer_size=0,
    )
    # Block the signals before connecting so none is lost between READY and the wait.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    store = connect_store(config)
    print(f"READY {store.get_hostname()}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
