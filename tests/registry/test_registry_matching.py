"""Unit tests of the pure matching rules (queries, expiry, NetworkService matches)."""

from __future__ import annotations

import pytest

from nsm.api.registry_pb2 import (
    Destination,
    Match,
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceLabels,
)
from nsm.registry.matching import (
    expiration,
    is_expired,
    is_subset,
    match_ns,
    match_nse,
    select_endpoints,
)

pytestmark = pytest.mark.timeout(10)

NOW = 1_700_000_000.0


def nse(
    name: str,
    services: dict[str, dict[str, str]] | None = None,
    *,
    url: str = "unix:///x.sock",
    expires: float | None = None,
) -> NetworkServiceEndpoint:
    services = {"svc": {}} if services is None else services
    record = NetworkServiceEndpoint(
        name=name,
        network_service_names=list(services),
        network_service_labels={s: NetworkServiceLabels(labels=lb) for s, lb in services.items()},
        url=url,
    )
    if expires is not None:
        record.expiration_time.seconds = int(expires)
        record.expiration_time.nanos = int((expires % 1) * 1e9)
    return record


def match(
    source: dict[str, str] | None = None,
    *destinations: dict[str, str],
    fallthrough: bool = False,
) -> Match:
    return Match(
        source_selector=source or {},
        routes=[Destination(destination_selector=d) for d in destinations],
        fallthrough=fallthrough,
    )


def names(records: list[NetworkServiceEndpoint]) -> list[str]:
    return [r.name for r in records]


# --- subsets and expiry ----------------------------------------------------------------------


def test_is_subset() -> None:
    assert is_subset({}, {})
    assert is_subset({}, {"a": "1"})
    assert is_subset({"a": "1"}, {"a": "1", "b": "2"})
    assert not is_subset({"a": "1"}, {"a": "2"})
    assert not is_subset({"a": "1"}, {})
    assert not is_subset({"a": ""}, {})  # a key with an empty value still has to be there
    assert is_subset({"a": ""}, {"a": ""})


def test_expiry() -> None:
    assert expiration(nse("a")) is None
    assert not is_expired(nse("a"), NOW)  # no expiration time: never expires
    assert expiration(nse("a", expires=NOW + 1.5)) == pytest.approx(NOW + 1.5)
    assert not is_expired(nse("a", expires=NOW + 0.001), NOW)
    assert is_expired(nse("a", expires=NOW), NOW)
    assert is_expired(nse("a", expires=NOW - 10), NOW)


# --- NS queries ------------------------------------------------------------------------------


def test_match_ns() -> None:
    ns = NetworkService(name="svc", payload="ETHERNET")
    assert match_ns(NetworkService(), ns)
    assert match_ns(NetworkService(name="svc"), ns)
    assert match_ns(NetworkService(payload="ETHERNET"), ns)
    assert match_ns(NetworkService(name="svc", payload="ETHERNET"), ns)
    assert not match_ns(NetworkService(name="sv"), ns)
    assert not match_ns(NetworkService(name="svc", payload="IP"), ns)
    # matches and path_ids in a query are ignored
    assert match_ns(NetworkService(name="svc", matches=[match({"a": "b"})]), ns)


# --- NSE queries -----------------------------------------------------------------------------


def test_match_nse_by_name_and_url() -> None:
    e = nse("e1", url="tcp://10.0.0.1:5001")
    assert match_nse(NetworkServiceEndpoint(), e)
    assert match_nse(NetworkServiceEndpoint(name="e1"), e)
    assert not match_nse(NetworkServiceEndpoint(name="e2"), e)
    assert match_nse(NetworkServiceEndpoint(url="tcp://10.0.0.1:5001"), e)
    assert not match_nse(NetworkServiceEndpoint(url="tcp://10.0.0.1:5002"), e)


def test_match_nse_by_services() -> None:
    e = nse("e1", {"a": {}, "b": {}})
    assert match_nse(NetworkServiceEndpoint(network_service_names=["a"]), e)
    assert match_nse(NetworkServiceEndpoint(network_service_names=["b", "a"]), e)
    assert not match_nse(NetworkServiceEndpoint(network_service_names=["a", "c"]), e)


def test_match_nse_by_labels() -> None:
    e = nse("e1", {"a": {"color": "red", "size": "xl"}, "b": {}})

    def q(labels: dict[str, dict[str, str]]) -> NetworkServiceEndpoint:
        return NetworkServiceEndpoint(
            network_service_labels={s: NetworkServiceLabels(labels=lb) for s, lb in labels.items()}
        )

    assert match_nse(q({"a": {}}), e)
    assert match_nse(q({"a": {"color": "red"}}), e)
    assert match_nse(q({"a": {"color": "red", "size": "xl"}}), e)
    assert not match_nse(q({"a": {"color": "blue"}}), e)
    assert not match_nse(q({"a": {"color": "red", "shape": "round"}}), e)
    assert not match_nse(q({"b": {"color": "red"}}), e)  # b has no labels
    assert not match_nse(q({"c": {"color": "red"}}), e)  # not offered at all
    assert match_nse(q({"c": {}}), e)  # empty label set for an unknown service: no constraint
    assert match_nse(q({"a": {"color": "red"}, "b": {}}), e)


def test_expired_nse_never_matches() -> None:
    e = nse("e1", expires=NOW - 1)
    assert not match_nse(NetworkServiceEndpoint(), e, now=NOW)
    assert not match_nse(NetworkServiceEndpoint(name="e1"), e, now=NOW)
    assert match_nse(NetworkServiceEndpoint(), e)  # now=None: expiry not considered
    assert match_nse(NetworkServiceEndpoint(), nse("e2", expires=NOW + 1), now=NOW)
    assert match_nse(NetworkServiceEndpoint(), nse("e3"), now=NOW)


# --- select_endpoints ------------------------------------------------------------------------

RED = nse("red", {"svc": {"color": "red", "zone": "a"}})
BLUE = nse("blue", {"svc": {"color": "blue", "zone": "a"}})
GREEN = nse("green", {"svc": {"color": "green", "zone": "b"}})
PLAIN = nse("plain", {"svc": {}})
OTHER = nse("other", {"other": {"color": "red"}})
ALL = [RED, BLUE, GREEN, PLAIN, OTHER]


def test_no_matches_gives_every_nse_offering_the_service() -> None:
    ns = NetworkService(name="svc")
    assert names(select_endpoints(ns, ALL, {})) == ["red", "blue", "green", "plain"]
    assert names(select_endpoints(ns, ALL, {"app": "x"})) == ["red", "blue", "green", "plain"]
    assert select_endpoints(ns, [], {}) == []
    assert select_endpoints(NetworkService(name="nope"), ALL, {}) == []


def test_first_applicable_source_selector_wins() -> None:
    ns = NetworkService(
        name="svc",
        matches=[
            match({"app": "a"}, {"color": "red"}),
            match({"app": "b"}, {"color": "blue"}),
            match({}, {"color": "green"}),  # empty selector: every client
        ],
    )
    assert names(select_endpoints(ns, ALL, {"app": "a"})) == ["red"]
    assert names(select_endpoints(ns, ALL, {"app": "b", "extra": "1"})) == ["blue"]
    assert names(select_endpoints(ns, ALL, {"app": "c"})) == ["green"]
    assert names(select_endpoints(ns, ALL, {})) == ["green"]


def test_source_selector_is_a_subset_of_source_labels() -> None:
    ns = NetworkService(name="svc", matches=[match({"app": "a", "tier": "db"}, {"color": "red"})])
    assert names(select_endpoints(ns, ALL, {"app": "a", "tier": "db", "x": "y"})) == ["red"]
    assert select_endpoints(ns, ALL, {"app": "a"}) == []  # selector not a subset: no match


def test_destination_selector_is_a_subset_of_nse_labels() -> None:
    ns = NetworkService(name="svc", matches=[match({}, {"zone": "a"})])
    assert names(select_endpoints(ns, ALL, {})) == ["red", "blue"]
    ns = NetworkService(name="svc", matches=[match({}, {"zone": "a", "color": "blue"})])
    assert names(select_endpoints(ns, ALL, {})) == ["blue"]
    # labels of another service don't count
    ns = NetworkService(name="svc", matches=[match({}, {"color": "red"})])
    assert names(select_endpoints(ns, ALL, {})) == ["red"]


def test_empty_destination_selector_matches_every_offering_nse() -> None:
    ns = NetworkService(name="svc", matches=[match({}, {})])
    assert names(select_endpoints(ns, ALL, {})) == ["red", "blue", "green", "plain"]


def test_routes_union_in_route_order_without_duplicates() -> None:
    ns = NetworkService(
        name="svc",
        matches=[match({}, {"color": "green"}, {"zone": "a"}, {"color": "red"}, {"zone": "b"})],
    )
    assert names(select_endpoints(ns, ALL, {})) == ["green", "red", "blue"]


def test_no_candidates_without_fallthrough_gives_none() -> None:
    ns = NetworkService(
        name="svc",
        matches=[match({}, {"color": "purple"}), match({}, {"color": "red"})],
    )
    assert select_endpoints(ns, ALL, {}) == []


def test_fallthrough_moves_to_the_next_applicable_match() -> None:
    ns = NetworkService(
        name="svc",
        matches=[
            match({"app": "a"}, {"color": "purple"}, fallthrough=True),
            match({"app": "zzz"}, {"color": "green"}),  # does not apply to app=a
            match({"app": "a"}, {"color": "blue"}),
        ],
    )
    assert names(select_endpoints(ns, ALL, {"app": "a"})) == ["blue"]


def test_fallthrough_is_ignored_when_there_are_candidates() -> None:
    ns = NetworkService(
        name="svc",
        matches=[match({}, {"color": "red"}, fallthrough=True), match({}, {"color": "blue"})],
    )
    assert names(select_endpoints(ns, ALL, {})) == ["red"]


def test_every_match_falling_through_gives_none() -> None:
    ns = NetworkService(
        name="svc", matches=[match({}, {"color": "purple"}, fallthrough=True)]
    )
    assert select_endpoints(ns, ALL, {}) == []


def test_no_applicable_match_gives_none() -> None:
    ns = NetworkService(name="svc", matches=[match({"app": "a"}, {})])
    assert select_endpoints(ns, ALL, {"app": "b"}) == []
    assert select_endpoints(ns, ALL, {}) == []


def test_match_without_routes_gives_none_or_falls_through() -> None:
    assert select_endpoints(NetworkService(name="svc", matches=[match({})]), ALL, {}) == []
    ns = NetworkService(
        name="svc", matches=[match({}, fallthrough=True), match({}, {"color": "green"})]
    )
    assert names(select_endpoints(ns, ALL, {})) == ["green"]


def test_nse_not_offering_the_service_is_never_selected() -> None:
    # "other" has color=red labels, but for another service
    ns = NetworkService(name="other", matches=[match({}, {"color": "red"})])
    assert names(select_endpoints(ns, ALL, {})) == ["other"]
    stray = NetworkServiceEndpoint(
        name="stray", network_service_labels={"svc": NetworkServiceLabels(labels={"zone": "a"})}
    )  # labels for svc but does not list it in network_service_names
    ns = NetworkService(name="svc", matches=[match({}, {"zone": "a"})])
    assert names(select_endpoints(ns, [stray, RED], {})) == ["red"]


def test_expired_nses_are_dropped_when_now_is_given() -> None:
    old = nse("old", {"svc": {"color": "red"}}, expires=NOW - 1)
    fresh = nse("fresh", {"svc": {"color": "red"}}, expires=NOW + 60)
    ns = NetworkService(name="svc")
    assert names(select_endpoints(ns, [old, fresh], {}, now=NOW)) == ["fresh"]
    assert names(select_endpoints(ns, [old, fresh], {})) == ["old", "fresh"]
    ns = NetworkService(name="svc", matches=[match({}, {"color": "red"})])
    assert names(select_endpoints(ns, [old, fresh], {}, now=NOW)) == ["fresh"]
    ns = NetworkService(
        name="svc",
        matches=[match({}, {"color": "red"}, fallthrough=True), match({}, {})],
    )
    assert select_endpoints(ns, [old], {}, now=NOW) == []


def test_same_named_nses_are_kept_apart() -> None:
    a = nse("dup", {"svc": {"color": "red"}}, url="unix:///a.sock")
    b = nse("dup", {"svc": {"color": "red"}}, url="unix:///b.sock")
    ns = NetworkService(name="svc", matches=[match({}, {"color": "red"}, {})])
    assert [e.url for e in select_endpoints(ns, [a, b], {})] == ["unix:///a.sock", "unix:///b.sock"]


def test_inputs_are_not_modified() -> None:
    ns = NetworkService(name="svc", matches=[match({"app": "a"}, {"color": "red"})])
    before = [e.SerializeToString() for e in ALL], ns.SerializeToString()
    select_endpoints(ns, ALL, {"app": "a"})
    assert ([e.SerializeToString() for e in ALL], ns.SerializeToString()) == before


def test_destination_selector_templates_use_the_clients_labels() -> None:
    from nsm.api.registry_pb2 import (
        Destination,
        Match,
        NetworkService,
        NetworkServiceEndpoint,
        NetworkServiceLabels,
    )
    from nsm.registry.matching import fill_templates, select_endpoints

    assert fill_templates({"n": "{{ .nodeName }}-x", "k": "v"}, {"nodeName": "a"}) == {
        "n": "a-x", "k": "v"}

    def nse(name: str, node: str) -> NetworkServiceEndpoint:
        return NetworkServiceEndpoint(
            name=name, network_service_names=["s"],
            network_service_labels={"s": NetworkServiceLabels(labels={"nodeName": node})})

    ns = NetworkService(name="s", matches=[
        Match(routes=[Destination(destination_selector={"nodeName": "{{.nodeName}}"})],
              fallthrough=True),
        Match(routes=[Destination()]),
    ])
    nses = [nse("e1", "node1"), nse("e2", "node2")]
    assert [n.name for n in select_endpoints(ns, nses, {"nodeName": "node2"})] == ["e2"]
    assert [n.name for n in select_endpoints(ns, nses, {"nodeName": "node3"})] == ["e1", "e2"]
