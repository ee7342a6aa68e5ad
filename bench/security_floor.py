"""The floor of what security must add to one local connection, measured apart from the mesh.

What issue 9 requires on every new local connection, and cannot be skipped or overlapped:

- **the new pod's TLS handshake** with its manager: a new gRPC channel over a unix socket and its
  first unary call, mTLS (EC P-256 SVIDs of the built-in CA, client certificate required) against
  plaintext, both ends in this process (so the CPU of both is counted, as on a 2-CPU node where
  both run);
- **the path tokens, hop by hop**: each of the client, manager, forwarder and endpoint mints an
  ES256 token for its segment (4 mints), every server verifies its caller's (3) and every caller
  verifies the token its next hop answered with (3), one after the other on the Request's path.

``floor_ms`` = handshake overhead + 4 mints + 6 verifications (p50 each). Divided by an
insecure local Request's p50 (``--insecure-ms``, e.g. ``bench.security``'s of the same run),
it is the least ratio any implementation of the issue's design reaches here, before namespace
proofs, identity proofs, certificate checks or per-hop TLS costs.

    python -m bench.security_floor [--n 300] [--insecure-ms 14.0] [--json-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.wrappers_pb2 import BytesValue

from nsm.security.ca import CertificateAuthority
from nsm.security.ids import DEFAULT_TRUST_DOMAIN, node_id, workload_id
from nsm.security.tokens import mint, verify

TD = DEFAULT_TRUST_DOMAIN
#: Mints and verifications on one local Request's path (module docstring).
MINTS, VERIFIES = 4, 6


async def _echo(request: BytesValue, context: grpc.aio.ServicerContext) -> BytesValue:
    return request


async def handshake(n: int, secure: bool, ca: CertificateAuthority) -> list[float]:
    """``n`` times: a new channel to a server on a unix socket and its first call (ms)."""
    server_svid = ca.issue(node_id(TD, "floor", "manager"), dns_names=(TD,))
    client_svid = ca.issue(workload_id(TD, "floor-pod"), dns_names=(TD,))
    handler = grpc.method_handlers_generic_handler("floor.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(
        _echo, request_deserializer=BytesValue.FromString, response_serializer=BytesValue.SerializeToString)})
    with tempfile.TemporaryDirectory(prefix="nsm-floor-") as tmp:
        target = f"unix:{Path(tmp) / 's.sock'}"
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        if secure:
            server.add_secure_port(target, grpc.ssl_server_credentials(
                [(server_svid.key_pem, server_svid.chain_pem)], root_certificates=server_svid.bundle_pem,
                require_client_auth=True))
        else:
            server.add_insecure_port(target)
        await server.start()
        out: list[float] = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                if secure:
                    channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(
                        client_svid.bundle_pem, client_svid.key_pem, client_svid.chain_pem),
                        options=(("grpc.ssl_target_name_override", TD),))
                else:
                    channel = grpc.aio.insecure_channel(target)
                call = channel.unary_unary("/floor.Echo/Echo",
                                           request_serializer=BytesValue.SerializeToString,
                                           response_deserializer=BytesValue.FromString)
                await call(BytesValue(value=b"x" * 32))
                out.append((time.perf_counter() - t0) * 1000)
                await channel.close()
        finally:
            await server.stop(None)
    return out


def tokens(n: int, ca: CertificateAuthority) -> tuple[list[float], list[float]]:
    """``n`` ES256 mints and verifications with the product's functions (ms each)."""
    svid = ca.issue(workload_id(TD, "floor-pod"), dns_names=(TD,))
    cert = svid.chain[0]
    audience = node_id(TD, "floor", "manager")
    minted, verified = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        token = mint(svid, audience, expires=time.time() + 600)
        t1 = time.perf_counter()
        verify(token.text, cert)
        t2 = time.perf_counter()
        minted.append((t1 - t0) * 1000)
        verified.append((t2 - t1) * 1000)
    return minted, verified


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 3)


async def measure(n: int, insecure_ms: float | None = None) -> dict[str, Any]:
    ca = CertificateAuthority.create(TD)
    await handshake(10, True, ca)  # warm both paths (first handshakes load the TLS library)
    await handshake(10, False, ca)
    secure, plain = [], []
    for _ in range(max(1, n // 50)):  # interleaved in blocks, so that drift hits both alike
        secure += await handshake(50, True, ca)
        plain += await handshake(50, False, ca)
    minted, verified = tokens(n, ca)
    handshake_ms = p50(secure) - p50(plain)
    floor = handshake_ms + MINTS * p50(minted) + VERIFIES * p50(verified)
    out: dict[str, Any] = {
        "n": len(secure),
        "new_channel_first_call_ms": {"secure_p50": p50(secure), "insecure_p50": p50(plain)},
        "handshake_overhead_ms": round(handshake_ms, 3),
        "es256_mint_ms_p50": p50(minted),
        "es256_verify_ms_p50": p50(verified),
        "mints_per_request": MINTS,
        "verifies_per_request": VERIFIES,
        "floor_ms": round(floor, 3),
    }
    if insecure_ms:
        out["insecure_request_ms"] = insecure_ms
        out["least_ratio"] = round((insecure_ms + floor) / insecure_ms, 3)
    return out


def table(result: dict[str, Any]) -> str:
    rows = [
        ("new channel + first call, mTLS (p50 ms)", result["new_channel_first_call_ms"]["secure_p50"]),
        ("new channel + first call, plaintext (p50 ms)", result["new_channel_first_call_ms"]["insecure_p50"]),
        ("handshake overhead (ms)", result["handshake_overhead_ms"]),
        ("ES256 mint (p50 ms)", result["es256_mint_ms_p50"]),
        ("ES256 verify (p50 ms)", result["es256_verify_ms_p50"]),
        (f"floor = handshake + {MINTS} mints + {VERIFIES} verifies (ms)", result["floor_ms"]),
    ]
    if "least_ratio" in result:
        rows.append((f"least ratio over an insecure request of {result['insecure_request_ms']} ms",
                     result["least_ratio"]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.security_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="handshakes per side, mints, verifications")
    parser.add_argument("--insecure-ms", type=float, default=None,
                        help="an insecure local Request's p50 (ms) to compute the least ratio")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    if args.n < 50:
        parser.error("--n must be at least 50")
    result = asyncio.run(measure(args.n, args.insecure_ms))
    result["machine"] = {"cpus": os.cpu_count(), "grpcio": grpc.__version__, "python": sys.version.split()[0]}
    if not args.json_only:
        print(table(result), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
