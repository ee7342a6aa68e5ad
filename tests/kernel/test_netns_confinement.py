"""Namespace confinement against the real kernel: the structural checks of a namespace a caller
names (:class:`nsm.kernel.netns.NodeNetns`), the ownership proof given by a listener inside the
namespace (:mod:`nsm.security.netns`), and the forwarder's Confine elements in a chain."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import statistics
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from nsm.api.connection_pb2 import Connection, PathSegment
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx, Element, NextClose, NextRequest
from nsm.errors import NotFound, PermissionDenied
from nsm.forwarder.confine import Confine
from nsm.forwarder.mechanism import PAIR, UPSTREAM
from nsm.kernel import netns as nsmod
from nsm.kernel.netns import NodeNetns, entered_netns
from nsm.lab.harness import NetnsGroup
from nsm.mechanisms import KERNEL, kernel, netns_url
from nsm.security.ca import CertificateAuthority
from nsm.security.ids import SpiffeId, node_id, parse_id, workload_id
from nsm.security.netns import NetnsProof, claimed_id, proof_address
from nsm.security.sources import CaSource
from nsm.security.svid import Svid
from nsm.security.tls import Security

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]

TD = "nsm.lab"
ALICE = workload_id(TD, "alice")
BOB = workload_id(TD, "bob")
FORWARDER = node_id(TD, "node1", "forwarder")
MANAGER = node_id(TD, "node1", "manager")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture
async def identities(ca: CertificateAuthority) -> AsyncIterator[Callable[[str], Security]]:
    """``identities(spiffe_id)``: a started Security of that ID under the module's CA."""
    made: list[Security] = []

    def make(spiffe_id: str, authority: CertificateAuthority | None = None) -> Security:
        sec = Security(CaSource(authority or ca, spiffe_id, trust_domain=TD), trust_domain=TD)
        made.append(sec)
        return sec

    async def started(spiffe_id: str, authority: CertificateAuthority | None = None) -> Security:
        sec = make(spiffe_id, authority)
        await sec.start()
        return sec

    yield started  # type: ignore[misc]
    for sec in made:
        await sec.close()


@pytest.fixture
def pods(netns_factory: NetnsGroup) -> NetnsGroup:
    return netns_factory


@contextlib.contextmanager
def opened(path: str) -> Iterator[int]:
    fd = nsmod.open_netns(path)
    try:
        yield fd
    finally:
        os.close(fd)


def token_for(svid: Svid, sub: str | None = None) -> str:
    return jwt.encode({"sub": sub or svid.id, "aud": [MANAGER], "exp": int(time.time()) + 60},
                      svid.key, algorithm="ES256")


# ------------------------------------------------------------------ structural checks


@pytest.mark.parametrize("what", ["self", "own-pid", "thread-self", "pid1"])
def test_the_node_namespace_and_pid1s_are_refused(what: str, pods: NetnsGroup) -> None:
    path = {"self": "/proc/self/ns/net", "own-pid": f"/proc/{os.getpid()}/ns/net",
            "thread-self": "/proc/thread-self/ns/net", "pid1": "/proc/1/ns/net"}[what]
    # (PID 1's may be unreadable to us, as in a container without CAP_SYS_PTRACE: refused too)
    with pytest.raises(PermissionDenied, match=r"node's own network namespace|PID 1's|cannot be opened"):
        NodeNetns().open(path)


def test_the_node_namespace_is_refused_when_the_node_is_not_pid1s(pods: NetnsGroup) -> None:
    """A forwarder in a node namespace (the lab): its own namespace, by any path, is refused."""
    node = pods("node")

    # NodeNetns reads /proc/self (the thread group leader's), so emulate a forwarder started in
    # ``node`` by handing it the node's identity (the e2e suite runs a real one).
    st = os.stat(node)
    nodens = NodeNetns(refused={(st.st_dev, st.st_ino): "the node's own network namespace"})
    with pytest.raises(PermissionDenied, match=f"{node} is the node's own network namespace"):
        nodens.open(node)
    assert len(nodens.refused) >= 2  # ours, the node's (and PID 1's when readable)
    nodens.open(pods("pod")).close()


@pytest.mark.parametrize("kind", ["regular-file", "directory", "mount-namespace", "dev-null",
                                  "symlink-to-file", "proc-file"])
def test_what_is_not_a_network_namespace_is_refused(kind: str, tmp_path: Path) -> None:
    regular = tmp_path / "netns"
    regular.write_text("")
    link = tmp_path / "link"
    link.symlink_to(regular)
    path = {"regular-file": str(regular), "directory": str(tmp_path),
            "mount-namespace": "/proc/self/ns/mnt", "dev-null": "/dev/null",
            "symlink-to-file": str(link), "proc-file": "/proc/self/status"}[kind]
    with pytest.raises(PermissionDenied, match=r"not a namespace file|not a network namespace|cannot be"):
        NodeNetns().open(path)


def test_a_missing_namespace_is_not_found(pods: NetnsGroup) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        NodeNetns().open(f"/var/run/netns/{pods.name('missing')}")


def test_a_pod_namespace_is_accepted_and_opened_once(pods: NetnsGroup) -> None:
    pod = pods("pod")
    ns = NodeNetns().open(pod)
    try:
        st = os.stat(pod)
        assert ns.ident == (st.st_dev, st.st_ino)
        assert os.fstat(ns.fd).st_ino == st.st_ino
    finally:
        ns.close()


# ------------------------------------------------------------------ the proof


async def test_the_right_identity_is_proven(identities, pods: NetnsGroup) -> None:
    alice, fwd = await identities(ALICE), await identities(FORWARDER)
    pod = pods("pod")
    async with NetnsProof.listen(alice, pod) as listener:
        assert listener is not None and listener.listening
        with opened(pod) as fd:
            assert str(await NetnsProof(fwd).prove(fd, parse_id(ALICE))) == ALICE


async def test_no_listener_is_refused(identities, pods: NetnsGroup) -> None:
    fwd = await identities(FORWARDER)
    with opened(pods("pod")) as fd:
        with pytest.raises(PermissionDenied, match="no proof listener"):
            await NetnsProof(fwd).prove(fd, ALICE)


async def test_a_listener_in_another_namespace_proves_nothing(identities, pods: NetnsGroup) -> None:
    """Alice's pod is hers; Bob's pod is not hers even though she listens in hers."""
    alice, fwd = await identities(ALICE), await identities(FORWARDER)
    mine, other = pods("alice"), pods("bob")
    async with NetnsProof.listen(alice, mine):
        with opened(other) as fd:
            with pytest.raises(PermissionDenied, match="no proof listener"):
                await NetnsProof(fwd).prove(fd, ALICE)


async def test_another_identitys_listener_is_refused(identities, pods: NetnsGroup) -> None:
    """Bob listens in his pod: a claim that it is Alice's finds nobody; and a Bob who squats
    Alice's address in it (answering with his own SVID) is refused too."""
    bob, fwd = await identities(BOB), await identities(FORWARDER)
    pod = pods("bob")
    async with NetnsProof.listen(bob, pod):
        with opened(pod) as fd:
            with pytest.raises(PermissionDenied, match="no proof listener"):
                await NetnsProof(fwd).prove(fd, ALICE)
            assert str(await NetnsProof(fwd).prove(fd, BOB)) == BOB
    async with fake_listener(pod, proof_address(ALICE), honest(bob.svid)):
        with opened(pod) as fd:
            with pytest.raises(PermissionDenied, match=f"its listener is {BOB}"):
                await NetnsProof(fwd).prove(fd, ALICE)


async def test_a_forged_signature_is_refused(identities, ca: CertificateAuthority,
                                             pods: NetnsGroup) -> None:
    """Alice's certificate (it is public) with a signature by another key."""
    alice, fwd = await identities(ALICE), await identities(FORWARDER)
    other = ca.issue(BOB)
    pod = pods("pod")

    def forged(request: bytes) -> bytes:
        sig = sign(other, request)
        return json.dumps({"chain": alice.svid.chain_pem.decode(), "signature": sig}).encode()

    async with fake_listener(pod, proof_address(ALICE), forged):
        with opened(pod) as fd:
            with pytest.raises(PermissionDenied, match="not signed by its SVID key"):
                await NetnsProof(fwd).prove(fd, ALICE)


async def test_an_svid_of_another_authority_is_refused(identities, pods: NetnsGroup) -> None:
    rogue = CertificateAuthority.create(TD)
    impostor, fwd = await identities(ALICE, rogue), await identities(FORWARDER)
    pod = pods("pod")
    async with NetnsProof.listen(impostor, pod):
        with opened(pod) as fd:
            with pytest.raises(PermissionDenied, match="no valid SVID"):
                await NetnsProof(fwd).prove(fd, ALICE)


async def test_a_replayed_answer_is_refused(identities, pods: NetnsGroup) -> None:
    """An answer recorded from an earlier proof (another nonce) does not prove a new one."""
    alice, fwd = await identities(ALICE), await identities(FORWARDER)
    pod = pods("pod")
    recorded: list[bytes] = []
    async with NetnsProof.listen(alice, pod) as listener:
        assert listener is not None
        original = listener._answer

        def record(request: bytes) -> bytes:
            recorded.append(original(request))
            return recorded[-1]

        listener._answer = record  # type: ignore[method-assign]
        with opened(pod) as fd:
            await NetnsProof(fwd).prove(fd, ALICE)
    async with fake_listener(pod, proof_address(ALICE), lambda _request: recorded[0]):
        with opened(pod) as fd:
            with pytest.raises(PermissionDenied, match="not signed by its SVID key"):
                await NetnsProof(fwd).prove(fd, ALICE)


async def test_a_silent_listener_is_refused_within_the_timeout(identities, pods: NetnsGroup) -> None:
    fwd = await identities(FORWARDER)
    pod = pods("pod")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async with fake_listener(pod, proof_address(ALICE), None, handler=silent):
        with opened(pod) as fd:
            start = time.monotonic()
            with pytest.raises(PermissionDenied, match="no proof from"):
                await NetnsProof(fwd).prove(fd, ALICE, timeout=0.3)
            assert time.monotonic() - start < 1.0


async def test_a_second_listener_of_the_same_identity_takes_over(identities, pods: NetnsGroup) -> None:
    """Two clients of one workload in one pod: the second stands by and takes the address over
    when the first closes, so the namespace stays proven."""
    alice, fwd = await identities(ALICE), await identities(FORWARDER)
    pod = pods("pod")
    async with NetnsProof.listen(alice, pod) as holder:
        standby_cm = NetnsProof.listen(alice, pod)
        standby = await standby_cm.__aenter__()
        try:
            assert holder is not None and holder.listening
            assert standby is not None and not standby.listening
            await holder.close()
            for _ in range(50):
                if standby.listening:
                    break
                await asyncio.sleep(0.05)
            assert standby.listening
            with opened(pod) as fd:
                await NetnsProof(fwd).prove(fd, ALICE)
        finally:
            await standby_cm.__aexit__(None, None, None)


async def test_insecure_listens_for_nothing(pods: NetnsGroup) -> None:
    async with NetnsProof.listen(Security.insecure(), pods("pod")) as listener:
        assert listener is None


async def test_the_proof_is_cheap(identities, pods: NetnsGroup) -> None:
    """One proof (socket inside the namespace, nonce, ES256 sign, chain check, verify) on this
    machine; the figure goes into the report. Loose bound: the machine is shared."""
    alice, fwd = await identities(ALICE), await identities(FORWARDER)
    pod = pods("pod")
    async with NetnsProof.listen(alice, pod):
        with opened(pod) as fd:
            times = []
            for _ in range(60):
                start = time.perf_counter()
                await NetnsProof(fwd).prove(fd, ALICE)
                times.append(time.perf_counter() - start)
    median = statistics.median(times[10:]) * 1000
    print(f"netns proof: median {median:.3f} ms, min {min(times) * 1000:.3f} ms")
    assert median < 10


def test_claimed_id_reads_the_tokens_sub_without_verifying(ca: CertificateAuthority) -> None:
    svid = ca.issue(ALICE)
    assert str(claimed_id(PathSegment(name="nsc", token=token_for(svid)))) == ALICE
    assert claimed_id(PathSegment(name="nsc")) is None
    assert claimed_id(PathSegment(name="nsc", token="not a jwt")) is None
    assert claimed_id(PathSegment(name="nsc", token=token_for(svid, sub="not-an-id"))) is None


# ------------------------------------------------------------------ helpers


def sign(svid: Svid, request: bytes) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from nsm.security.netns import CONTEXT
    return base64.b64encode(svid.key.sign(CONTEXT + request, ec.ECDSA(hashes.SHA256()))).decode()


def honest(svid: Svid) -> Callable[[bytes], bytes]:
    return lambda request: json.dumps({"chain": svid.chain_pem.decode(),
                                       "signature": sign(svid, request)}).encode()


@contextlib.asynccontextmanager
async def fake_listener(netns: str, address: bytes, answer: Callable[[bytes], bytes] | None, *,
                        handler=None) -> AsyncIterator[None]:
    """A listener at ``address`` inside ``netns`` that answers ``answer(request)``."""
    import socket

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            (size,) = struct.unpack(">I", await reader.readexactly(4))
            request = await reader.readexactly(size)
            assert answer is not None
            data = answer(request)
            writer.write(struct.pack(">I", len(data)) + data)
            await writer.drain()
        finally:
            writer.close()

    with opened(netns) as fd, entered_netns(fd):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen()
    server = await asyncio.start_unix_server(handler or serve, sock=sock)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------------ the forwarder's elements


class Stub(Element):
    """Stands for SelectMechanism: the client's mechanism upstream, a KERNEL pair."""

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        ctx.meta.set(UPSTREAM, request.mechanism_preferences[0])
        ctx.meta.set(PAIR, (KERNEL, KERNEL))
        return await next(ctx, request)


class Datapath(Element):
    """Stands for KernelLocal: records what it would build after the answer."""

    def __init__(self) -> None:
        self.built: list[str] = []

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        conn = await next(ctx, request)
        self.built.append(conn.mechanism.parameters["inodeURL"])
        return conn


class FakeEndpoint(Element):
    """Answers KERNEL with its namespace and a segment token of its identity."""

    def __init__(self, netns: str, token: str) -> None:
        self.netns, self.token = netns, token
        self.requests = self.closes = 0

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        self.requests += 1
        conn = Connection()
        conn.CopyFrom(request.connection)
        conn.path.path_segments.add(name="nse", id="nse-1", token=self.token)
        conn.mechanism.CopyFrom(kernel("nse-1", netns_url(self.netns)))
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        self.closes += 1


class SlowEndpoint(FakeEndpoint):
    """A FakeEndpoint that takes a while to answer, as a real one across gRPC does."""

    answers = 0

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        conn = await super().request(ctx, request, next)
        await asyncio.sleep(0.05)
        self.answers += 1
        return conn


def forwarder_chain(fwd: Security, nse_ns: str, nse_token: str,
                    nodens: NodeNetns | None = None) -> tuple[Chain, Datapath, FakeEndpoint]:
    confine = Confine(fwd, node="node1", nodens=nodens)
    datapath, endpoint = Datapath(), FakeEndpoint(nse_ns, nse_token)
    return Chain([Stub(), confine.before, datapath, confine.after, endpoint]), datapath, endpoint


def client_request(netns: str, token: str) -> NetworkServiceRequest:
    request = NetworkServiceRequest()
    request.connection.id = "c1"
    request.connection.path.path_segments.add(name="nsc", id="c1", token=token)
    request.connection.path.path_segments.add(name="manager", id="m1")
    request.mechanism_preferences.append(kernel("nsm-1", netns_url(netns)))
    return request


async def test_confine_builds_only_in_proven_namespaces(identities, pods: NetnsGroup) -> None:
    alice, nse, fwd = (await identities(ALICE), await identities(workload_id(TD, "nse")),
                       await identities(FORWARDER))
    client_ns, nse_ns, bobs = pods("alice"), pods("nse"), pods("bob")
    chain, datapath, endpoint = forwarder_chain(fwd, nse_ns, token_for(nse.svid))
    async with NetnsProof.listen(alice, client_ns), NetnsProof.listen(nse, nse_ns):
        ctx = chain.context(peer=parse_id(MANAGER))
        ctx.conn_id = "c1"
        await chain.request(client_request(client_ns, token_for(alice.svid)), ctx)
        assert datapath.built == [netns_url(nse_ns)]

        # Alice names Bob's pod: refused, nothing built, what the endpoint did is closed.
        ctx2 = chain.context(peer=parse_id(MANAGER))
        ctx2.conn_id = "c2"
        with pytest.raises(PermissionDenied, match=f"{bobs}.*no proof listener"):
            await chain.request(client_request(bobs, token_for(alice.svid)), ctx2)
        assert datapath.built == [netns_url(nse_ns)] and endpoint.closes == 1

        # The node's namespace: refused before anything, the endpoint is not even asked.
        asked = endpoint.requests
        with pytest.raises(PermissionDenied, match="node's own network namespace"):
            await chain.request(client_request("/proc/self/ns/net", token_for(alice.svid)),
                                chain.context(peer=parse_id(MANAGER)))
        assert endpoint.requests == asked

        # Another caller than this node's manager may not name a namespace at all.
        with pytest.raises(PermissionDenied, match="only this node's manager"):
            await chain.request(client_request(client_ns, token_for(alice.svid)),
                                chain.context(peer=parse_id(node_id(TD, "node2", "manager"))))
        # No token: nobody to prove it for.
        with pytest.raises(PermissionDenied, match="carries no token"):
            await chain.request(client_request(client_ns, ""), chain.context(peer=parse_id(MANAGER)))
        assert datapath.built == [netns_url(nse_ns)]

    # A refresh with the same namespaces needs no proof (the listeners are gone now).
    await chain.request(client_request(client_ns, token_for(alice.svid)), ctx)
    assert datapath.built == [netns_url(nse_ns)] * 2


async def test_confine_refuses_an_endpoint_answering_another_namespace(identities,
                                                                       pods: NetnsGroup) -> None:
    alice, nse, fwd = (await identities(ALICE), await identities(workload_id(TD, "nse")),
                       await identities(FORWARDER))
    client_ns, nse_ns = pods("alice"), pods("nse")
    for answer, reason in ((client_ns, "no proof listener"),
                           ("/proc/self/ns/net", "node's own network namespace"),
                           ("/proc/self/ns/mnt", "not a network namespace")):
        chain, datapath, endpoint = forwarder_chain(fwd, answer, token_for(nse.svid))
        async with NetnsProof.listen(alice, client_ns), NetnsProof.listen(nse, nse_ns):
            with pytest.raises(PermissionDenied, match=reason):
                await chain.request(client_request(client_ns, token_for(alice.svid)),
                                    chain.context(peer=parse_id(MANAGER)))
        assert datapath.built == [] and endpoint.closes == 1, answer


async def test_confine_proves_the_endpoints_last_namespace_while_it_is_asked(identities,
                                                                             pods: NetnsGroup) -> None:
    """After a first answer, the endpoint's namespace is proven while the endpoint is asked
    (speculatively); the proof counts only for the same namespace and identity: an answer
    naming another namespace, or a namespace whose listener left, is refused as before."""
    alice, nse, fwd = (await identities(ALICE), await identities(workload_id(TD, "nse")),
                       await identities(FORWARDER))
    client_ns, nse_ns, other = pods("alice"), pods("nse"), pods("other")
    confine = Confine(fwd, node="node1")
    datapath, endpoint = Datapath(), SlowEndpoint(nse_ns, token_for(nse.svid))
    chain = Chain([Stub(), confine.before, datapath, confine.after, endpoint])
    proofs: list[tuple[str, int]] = []  # (claimed ID, the endpoint's answers when the proof began)
    prove = confine.proof.prove

    async def counted(fd: int, claimed: SpiffeId | str, **kwargs: Any) -> SpiffeId:
        proofs.append((str(claimed), endpoint.answers))
        return await prove(fd, claimed, **kwargs)

    confine.proof.prove = counted  # type: ignore[method-assign]
    mine = workload_id(TD, "nse")

    async def request(conn_id: str) -> None:
        ctx = chain.context(peer=parse_id(MANAGER))
        ctx.conn_id = conn_id
        r = client_request(client_ns, token_for(alice.svid))
        r.connection.id = conn_id
        await chain.request(r, ctx)

    async with NetnsProof.listen(alice, client_ns):
        async with NetnsProof.listen(nse, nse_ns):
            await request("c1")  # the first: proven after the answer
            assert [n for sid, n in proofs if sid == mine] == [1]
            await request("c2")  # then while the endpoint is asked, before it answers
            assert [n for sid, n in proofs if sid == mine] == [1, 1]
            assert datapath.built == [netns_url(nse_ns)] * 2
        # The endpoint's listener left: the guess fails, the answer is proven anew and refused.
        with pytest.raises(PermissionDenied, match=f"{nse_ns}.*no proof listener"):
            await request("c3")
        async with NetnsProof.listen(nse, nse_ns):
            # The endpoint answers another namespace: the guess does not count for it.
            endpoint.netns = other
            with pytest.raises(PermissionDenied, match=f"{other}.*no proof listener"):
                await request("c4")
    assert datapath.built == [netns_url(nse_ns)] * 2 and endpoint.closes == 2


async def test_confine_insecure_checks_structure_only(pods: NetnsGroup) -> None:
    client_ns, nse_ns = pods("c"), pods("e")
    chain, datapath, _ = forwarder_chain(Security.insecure(), nse_ns, "")
    await chain.request(client_request(client_ns, ""))
    assert datapath.built == [netns_url(nse_ns)]
    with pytest.raises(PermissionDenied, match="node's own network namespace"):
        await chain.request(client_request("/proc/self/ns/net", ""))


# ------------------------------------------------------------------ the workloads' listeners


class Tail(Element):
    def __init__(self) -> None:
        self.fail = False

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        if self.fail:
            raise PermissionDenied("refused downstream")
        return request.connection


async def proven(fwd: Security, netns: str, who: str) -> bool:
    with opened(netns) as fd:
        try:
            await NetnsProof(fwd).prove(fd, who)
        except PermissionDenied:
            return False
    return True


async def test_a_client_holds_a_listener_while_a_connection_names_the_namespace(
        identities, pods: NetnsGroup) -> None:
    from nsm.client.netns import ProveNetns

    alice, fwd = await identities(ALICE), await identities(FORWARDER)
    pod, other = pods("pod"), pods("other")
    prove, tail = ProveNetns(alice), Tail()
    chain = Chain([prove, tail])

    def ctx_for(conn_id: str) -> Ctx:
        ctx = chain.context()
        ctx.conn_id = conn_id
        return ctx

    await chain.request(client_request(pod, ""), ctx_for("c1"))
    await chain.request(client_request(pod, ""), ctx_for("c2"))
    assert prove.listeners == 1 and await proven(fwd, pod, ALICE)
    await chain.close(Connection(id="c1"), ctx_for("c1"))
    assert await proven(fwd, pod, ALICE)  # c2 still names it
    await chain.close(Connection(id="c2"), ctx_for("c2"))
    assert prove.listeners == 0 and not await proven(fwd, pod, ALICE)

    tail.fail = True  # a failed first Request leaves no listener
    with pytest.raises(PermissionDenied):
        await chain.request(client_request(other, ""), ctx_for("c3"))
    assert prove.listeners == 0 and not await proven(fwd, other, ALICE)

    tail.fail = False
    await chain.request(client_request(other, ""), ctx_for("c4"))
    await chain.shutdown()
    assert prove.listeners == 0 and not await proven(fwd, other, ALICE)


async def test_an_endpoint_proves_its_namespace_while_it_runs(identities, pods: NetnsGroup,
                                                             tmp_path: Path) -> None:
    from nsm.endpoint.endpoint import Endpoint

    nse_id = workload_id(TD, "nse")
    nse, fwd = await identities(nse_id), await identities(FORWARDER)
    pod = pods("nse")
    endpoint = Endpoint(name="nse", services=["ip"], cidr="10.1.0.0/24",
                        listen=[f"unix://{tmp_path}/nse.sock"], netns=pod, security=nse)
    async with endpoint:
        assert await proven(fwd, pod, nse_id)
    assert not await proven(fwd, pod, nse_id)
