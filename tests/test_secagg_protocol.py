"""crypto.secagg_protocol without a network: exact sums with dropouts at each stage while at
least t clients survive, loud failure below t, and no single input exposed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crypto import secagg
from crypto.fixedpoint import FixedPoint
from crypto.secagg_protocol import ClientSession, neighbourhoods, round_graph, unmask_sum

BITS, LENGTH, CONTEXT = 24, 500, b"run-A/round-1"
IDENTITIES = [Ed25519PrivateKey.generate() for _ in range(12)]  # the nodes' enrolled keys


def sessions(n, threshold, length=LENGTH):
    return {i: ClientSession(i, threshold, BITS, length, CONTEXT) for i in range(n)}


def advertise(clients):
    return {i: c.advertise(IDENTITIES[i]) for i, c in clients.items()}


def publics(ads):
    return {i: (ad.c_public, ad.s_public) for i, ad in ads.items()}


def run_round(n, threshold, neighbours=0, drop_before_share=(), drop_before_mask=(), drop_before_consistency=(),
              drop_before_unmask=(), seed=0):
    """One honest round of the real client code, the server's part played here."""
    rng = np.random.default_rng(seed)
    encoding = FixedPoint(16)
    inputs = {i: encoding.encode(rng.normal(size=LENGTH), 1.0, 4.0)[0] for i in range(n)}
    clients = sessions(n, threshold)
    ads = advertise(clients)
    sealed = {i: clients[i].share(ads, neighbours) for i in clients if i not in drop_before_share}
    graph = round_graph(CONTEXT, publics(ads), neighbours)
    holders = {i: [j for j in graph[i] if j in sealed] for i in sealed}
    masked = {i: clients[i].mask(inputs[i], holders[i]) for i in sealed if i not in drop_before_mask}
    survivors = sorted(masked)
    signatures = {i: clients[i].sign_survivors(survivors, IDENTITIES[i]) for i in masked if i not in drop_before_consistency}
    revealed = [clients[i].unmask({j: sealed[j][i] for j in holders[i]}, signatures)
                for i in signatures if i not in drop_before_unmask]
    total = unmask_sum(masked, revealed, {i: ad.s_public for i, ad in ads.items()}, {i: holders[i] for i in masked},
                       threshold, BITS, CONTEXT)
    expected = sum(inputs[i] for i in masked) % np.uint64(1 << BITS)
    return total, expected, masked, inputs


def test_without_dropouts_the_server_gets_exactly_the_sum():
    total, expected, _, _ = run_round(6, 4)
    assert (total == expected).all()


STAGES = ["drop_before_share", "drop_before_mask", "drop_before_consistency", "drop_before_unmask"]


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_above_the_threshold_still_give_the_exact_sum_of_the_survivors(stage):
    total, expected, masked, _ = run_round(7, 4, **{stage: (1, 5)})
    assert (total == expected).all()
    if stage in ("drop_before_share", "drop_before_mask"):
        assert sorted(masked) == [0, 2, 3, 4, 6]


@pytest.mark.parametrize("stage", STAGES)
def test_below_the_threshold_the_round_fails_loudly(stage):
    with pytest.raises(ValueError, match="threshold|needed|quorum"):
        run_round(6, 4, **{stage: (0, 2, 3)})


def test_a_masked_input_is_not_the_input_and_one_client_cannot_be_unmasked_alone():
    _, _, masked, inputs = run_round(5, 3)
    for i, y in masked.items():
        assert np.mean(y == inputs[i]) < 0.01
    # A server holding only the masked inputs and fewer than t shares cannot remove a self mask.
    client = ClientSession(0, 3, BITS, LENGTH, CONTEXT)
    shares = secagg.split_secret(client.b_secret, 3, 5)
    with pytest.raises(ValueError, match="needed"):
        secagg.combine_secret(shares[:2], 3)


def masked_round(n, threshold, holders=None):
    """Clients that advertised, shared and masked (all with all unless ``holders`` says otherwise):
    what a server has in hand when it starts to lie."""
    clients = sessions(n, threshold)
    ads = advertise(clients)
    sealed = {i: c.share(ads, 0) for i, c in clients.items()}
    rng = np.random.default_rng(2)
    inputs = {i: rng.integers(0, 1 << 12, LENGTH).astype(np.uint64) for i in clients}
    holders = {i: (holders or {}).get(i, list(range(n))) for i in clients}
    masked = {i: clients[i].mask(inputs[i], holders[i]) for i in clients}
    return clients, ads, sealed, holders, masked, inputs


def test_a_client_never_reveals_both_secrets_of_a_neighbour():
    clients, _, sealed, _, _, _ = masked_round(5, 3)
    signatures = {i: clients[i].sign_survivors([0, 1, 2, 3], IDENTITIES[i]) for i in range(4)}
    answer = clients[0].unmask({j: sealed[j][0] for j in range(5)}, signatures)
    assert {j: kind for j, (kind, _) in answer.items()} == {0: "b", 1: "b", 2: "b", 3: "b", 4: "s"}


def test_a_session_survives_a_round_trip_through_its_state():
    clients = {3: ClientSession(3, 2, BITS, LENGTH, CONTEXT), 5: ClientSession(5, 2, BITS, LENGTH, CONTEXT)}
    client = clients[3]
    client.share({i: c.advertise(IDENTITIES[i]) for i, c in clients.items()}, 0)
    restored = ClientSession.from_state(client.to_state())
    x = np.arange(LENGTH, dtype=np.uint64)
    assert (restored.mask(x, [3, 5]) == client.mask(x, [3, 5])).all()
    assert ClientSession.from_state(client.to_state()).holders == [3, 5]  # masked: it stays so
    client.sign_survivors([3, 5], IDENTITIES[3])
    assert ClientSession.from_state(client.to_state()).survivors == [3, 5]


def test_a_client_refuses_what_a_lying_server_asks_of_it():
    """Issue 22 (malicious server, the client's own checks): each request below was answered
    before. (a) holders fewer than the threshold: the server would hold enough shares of the
    client's self mask; (c) a second masked input in one round: subtracting the two reveals the
    difference of the inputs; a second survivor set, or one without the client, without enough
    of its holders or short of a quorum: not one consistent round."""
    clients = sessions(4, 3)
    ads = advertise(clients)
    sealed = {i: c.share(ads, 0) for i, c in clients.items()}
    x = np.arange(LENGTH, dtype=np.uint64)
    with pytest.raises(ValueError, match="fewer than the threshold 3: refusing to mask"):
        clients[0].mask(x, [0])
    with pytest.raises(ValueError, match="fewer than the threshold 3: refusing to mask"):
        clients[0].mask(x, [0, 1])
    clients[0].mask(x, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="second input in one round"):
        clients[0].mask(x + np.uint64(1), [0, 1, 2, 3])
    for survivors in ([1, 2, 3], [0, 1], [0, 1, 2, 7]):
        with pytest.raises(ValueError, match="refusing to sign"):
            clients[0].sign_survivors(survivors, IDENTITIES[0])
    mine = {j: sealed[j][0] for j in range(4)}
    with pytest.raises(ValueError, match="signed no survivor set"):
        clients[0].unmask(mine, {})
    signature = clients[0].sign_survivors([0, 1, 2], IDENTITIES[0])
    with pytest.raises(ValueError, match="second survivor set"):
        clients[0].sign_survivors([0, 1, 2, 3], IDENTITIES[0])
    for i in (1, 2, 3):
        clients[i].mask(x, [0, 1, 2, 3])
    others = {i: clients[i].sign_survivors([0, 1, 2], IDENTITIES[i]) for i in (1, 2)}
    forged = {1: others[1], 2: IDENTITIES[3].sign(b"anything")}  # one signature is not client 2's
    with pytest.raises(ValueError, match="fewer than the quorum 3"):
        clients[0].unmask(mine, {0: signature, **forged})
    assert sorted(clients[0].unmask(mine, {0: signature, **others})) == [0, 1, 2, 3]


def test_a_server_that_names_two_survivor_sets_to_two_groups_learns_nothing():
    """Issue 22, attack (b): the server gives client 0 holders {0, 1, 2} only (t = 3 of 6, the
    operator's explicit secagg-threshold), tells {0, 1, 2} that they alone survived (so they
    reveal the self-mask seed of 0) and tells {3, 4, 5} that 1 and 2 dropped (so they reveal
    the mask keys of 1 and 2): with both, the masks come off client 0's input alone. On 1edf0f8
    (the semi-honest protocol) every client answered and the script recovered the input
    exactly. Now a client signs one survivor set per round and reveals only with a quorum of
    signatures (more than half of the round) over the very set it signed: no split works."""
    clients, ads, sealed, holders, masked, inputs = masked_round(6, 3, holders={0: [0, 1, 2]})

    def answers(group, survivors):
        """Each client of ``group`` asked to sign ``survivors`` and then to unmask with every
        signature the server holds: the answers the server gets, and the refusals."""
        got, refused = {}, []
        signatures = {}
        for i in group:
            try:
                signatures[i] = clients[i].sign_survivors(survivors, IDENTITIES[i])
            except ValueError as exc:
                refused.append(str(exc))
        for i in signatures:
            try:
                got[i] = clients[i].unmask({j: sealed[j][i] for j in holders[i]}, signatures)
            except ValueError as exc:
                refused.append(str(exc))
        return got, refused

    first, refused_first = answers([0, 1, 2], [0, 1, 2])  # 3 of 6 is not a quorum: no one signs
    assert first == {} and all("quorum 4" in r for r in refused_first)
    first, _ = answers([0, 1, 2, 3], [0, 1, 2, 3])  # a quorum signs {0, 1, 2, 3}, and they reveal
    assert sorted(first) == [0, 1, 2, 3]
    second, refused_second = answers([3, 4, 5], [0, 3, 4, 5])  # 3 signed already; 4 and 5 are no quorum
    assert second == {} and any("second survivor set" in r for r in refused_second)
    assert all(kind == "b" for answer in first.values() for j, (kind, _) in answer.items() if j in (1, 2))
    # What the server holds cannot take client 0's pairwise masks off: no share of 1's or 2's key.
    s_shares = [answer[d][1] for answer in first.values() for d in (1, 2) if answer[d][0] == "s"]
    assert s_shares == []  # (the sum the server unmasks is garbage: it told client 0 other holders than the rest)


def test_the_graph_is_the_one_the_advertisements_fix_and_clients_refuse_forged_advertisements():
    """Issue 22 (Bell et al.'s graph, signed advertisements): failed before: the server sent
    each client its neighbours and their keys, so it chose who a victim masks with and could
    stand in for any of them with keys of its own. Now a client derives its neighbourhood from
    a seed the advertised keys fix and checks every advertisement's signature."""
    clients = sessions(10, 3)
    ads = advertise(clients)
    graph = round_graph(CONTEXT, publics(ads), 4)
    assert all(len(links) == 5 for links in graph.values())
    sealed = clients[0].share(ads, 4)
    assert sorted(sealed) == graph[0]
    # The same keys always give the same graph; fresh keys another (the server cannot pick it).
    assert round_graph(CONTEXT, publics(ads), 4) == graph
    assert any(round_graph(CONTEXT, publics(advertise(sessions(10, 3))), 4) != graph for _ in range(3))
    client = sessions(10, 3)[0]
    own = client.advertise(IDENTITIES[0])
    stand_in = ClientSession(1, 3, BITS, LENGTH, CONTEXT).advertise(Ed25519PrivateKey.generate())  # the server's keys and key
    twice = ClientSession(1, 3, BITS, LENGTH, CONTEXT).advertise(IDENTITIES[2])  # node 2's identity for node 1 too
    lies = [
        ({**ads, 0: own, 1: dataclasses.replace(ads[1], c_public=stand_in.c_public)}, "not signed by the identity it names"),
        ({**ads, 0: own, 1: twice}, "one identity key advertises for two clients"),
        ({**ads, 0: dataclasses.replace(own, s_public=stand_in.s_public)}, "own advertisement is missing or altered"),
        ({j: ad for j, ad in ads.items() if j != 0}, "own advertisement is missing or altered"),
    ]
    for lie, reason in lies:
        with pytest.raises(ValueError, match=reason):
            client.share(lie, 4)
    assert sorted(client.share({**ads, 0: own}, 4)) == round_graph(CONTEXT, publics({**ads, 0: own}), 4)[0]
    # With enrolled identities but unsigned stand-in keys, an enrolled-only check would not do.
    assert stand_in.problem(CONTEXT) is None


@pytest.mark.parametrize("n,k", [(10, 4), (11, 3), (6, 0), (6, 9)])
def test_neighbourhoods_are_symmetric_and_as_large_as_asked(n, k):
    graph = neighbourhoods(range(n), k)
    for m, links in graph.items():
        assert m in links
        assert all(m in graph[j] for j in links)
        assert len(links) == (n if k == 0 or k >= n - 1 else 2 * -(-k // 2) + 1)


@pytest.mark.parametrize("drop", [(), (2,), (2, 7)])
def test_sparse_graph_rounds_give_the_exact_sum(drop):
    """SecAgg+: each client shares and masks with its neighbours only; dropouts after sharing
    are unmasked by the neighbours' shares."""
    total, expected, masked, _ = run_round(10, 3, neighbours=4, drop_before_mask=drop, seed=1)
    assert (total == expected).all() and len(masked) == 10 - len(drop)


def test_what_the_server_receives_from_one_client_is_independent_of_its_input():
    """Many fresh rounds of two clients: client 0's masked value (self mask + pairwise mask, as
    sent) has the same uniform distribution for a tiny and a huge input, and no correlation."""
    from scipy import stats

    bits, trials = 16, 1500
    sent = {}
    for value in (3, 60000):
        outputs = []
        for _ in range(trials):
            a, b = ClientSession(0, 2, bits, 1, CONTEXT), ClientSession(1, 2, bits, 1, CONTEXT)
            a.share({0: a.advertise(IDENTITIES[0]), 1: b.advertise(IDENTITIES[1])}, 0)
            outputs.append(int(a.mask(np.array([value], dtype=np.uint64), [0, 1])[0]))
        sent[value] = np.array(outputs)
    for outputs in sent.values():
        assert stats.chisquare(np.bincount(outputs >> 12, minlength=16)).pvalue > 1e-4  # uniform top bits
    inputs = np.repeat([3, 60000], trials)
    assert abs(np.corrcoef(inputs, np.concatenate([sent[3], sent[60000]]))[0, 1]) < 0.1
    assert stats.ks_2samp(sent[3], sent[60000]).pvalue > 1e-4
