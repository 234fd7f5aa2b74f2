"""crypto.secagg_protocol without a network: exact sums with dropouts at each stage while at
least t clients survive, loud failure below t, and no single input exposed."""

from __future__ import annotations

import numpy as np
import pytest

from crypto.fixedpoint import FixedPoint
from crypto.secagg_protocol import ClientSession, neighbourhoods, unmask_sum

BITS, LENGTH, CONTEXT = 24, 500, b"run-A/round-1"


def run_round(n, threshold, drop_before_share=(), drop_before_mask=(), drop_before_unmask=(), seed=0):
    rng = np.random.default_rng(seed)
    encoding = FixedPoint(16)
    inputs = {i: encoding.encode(rng.normal(size=LENGTH), 1.0, 4.0)[0] for i in range(n)}
    clients = {i: ClientSession(i, threshold, BITS, LENGTH, CONTEXT) for i in range(n)}
    publics = {i: c.advertise() for i, c in clients.items()}
    sharing = [i for i in clients if i not in drop_before_share]
    sealed = {i: clients[i].share({j: publics[j] for j in sharing}) for i in sharing}
    holders = sorted(sealed)
    masking = [i for i in holders if i not in drop_before_mask]
    masked = {i: clients[i].mask(inputs[i], holders) for i in masking}
    answering = [i for i in masking if i not in drop_before_unmask]
    revealed = [clients[i].unmask({j: sealed[j][i] for j in holders}, masked) for i in answering]
    total = unmask_sum(masked, revealed, {i: publics[i][1] for i in holders}, {i: holders for i in masked}, threshold, BITS, CONTEXT)
    expected = sum(inputs[i] for i in masked) % np.uint64(1 << BITS)
    return total, expected, masked, inputs


def test_without_dropouts_the_server_gets_exactly_the_sum():
    total, expected, _, _ = run_round(6, 4)
    assert (total == expected).all()


@pytest.mark.parametrize("stage", ["drop_before_share", "drop_before_mask", "drop_before_unmask"])
def test_dropouts_above_the_threshold_still_give_the_exact_sum_of_the_survivors(stage):
    total, expected, masked, _ = run_round(7, 4, **{stage: (1, 5)})
    assert (total == expected).all()
    if stage != "drop_before_unmask":
        assert sorted(masked) == [0, 2, 3, 4, 6]


@pytest.mark.parametrize("stage", ["drop_before_share", "drop_before_mask", "drop_before_unmask"])
def test_below_the_threshold_the_round_fails_loudly(stage):
    with pytest.raises(ValueError, match="threshold|needed"):
        run_round(6, 4, **{stage: (0, 2, 3)})


def test_a_masked_input_is_not_the_input_and_one_client_cannot_be_unmasked_alone():
    _, _, masked, inputs = run_round(5, 3)
    for i, y in masked.items():
        assert np.mean(y == inputs[i]) < 0.01
    # A server holding only the masked inputs and fewer than t shares cannot remove a self mask.
    from crypto import secagg

    client = ClientSession(0, 3, BITS, LENGTH, CONTEXT)
    shares = secagg.split_secret(client.b_secret, 3, 5)
    with pytest.raises(ValueError, match="needed"):
        secagg.combine_secret(shares[:2], 3)


def test_a_client_never_reveals_both_secrets_of_a_neighbour():
    n, threshold = 5, 3
    clients = {i: ClientSession(i, threshold, BITS, LENGTH, CONTEXT) for i in range(n)}
    publics = {i: c.advertise() for i, c in clients.items()}
    sealed = {i: c.share(publics) for i, c in clients.items()}
    for c in clients.values():
        c.mask(np.zeros(LENGTH, dtype=np.uint64), range(n))
    answer = clients[0].unmask({j: sealed[j][0] for j in range(n)}, survivors=[0, 1, 2, 3])
    assert {j: kind for j, (kind, _) in answer.items()} == {0: "b", 1: "b", 2: "b", 3: "b", 4: "s"}


def test_a_session_survives_a_round_trip_through_its_state():
    client = ClientSession(3, 2, BITS, LENGTH, CONTEXT)
    other = ClientSession(5, 2, BITS, LENGTH, CONTEXT)
    publics = {3: client.advertise(), 5: other.advertise()}
    client.share(publics)
    restored = ClientSession.from_state(client.to_state())
    x = np.arange(LENGTH, dtype=np.uint64)
    assert (restored.mask(x, [3, 5]) == client.mask(x, [3, 5])).all()
    assert ClientSession.from_state(client.to_state()).holders == [3, 5]  # masked: it stays so


def test_a_client_refuses_what_a_lying_server_asks_of_it():
    """Issue 22 (malicious server, the client's own checks): each request below was answered
    before. (a) holders fewer than the threshold: the server would hold enough shares of the
    client's self mask; (c) a second masked input in one round: subtracting the two reveals the
    difference of the inputs; survivors outside the client's holders or without the client: not
    the round it masked in."""
    clients = {i: ClientSession(i, 3, BITS, LENGTH, CONTEXT) for i in range(4)}
    publics = {i: c.advertise() for i, c in clients.items()}
    sealed = {i: c.share(publics) for i, c in clients.items()}
    x = np.arange(LENGTH, dtype=np.uint64)
    with pytest.raises(ValueError, match="fewer than the threshold 3: refusing to mask"):
        clients[0].mask(x, [0])
    with pytest.raises(ValueError, match="fewer than the threshold 3: refusing to mask"):
        clients[0].mask(x, [0, 1])
    clients[0].mask(x, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="second input in one round"):
        clients[0].mask(x + np.uint64(1), [0, 1, 2, 3])
    mine = {j: sealed[j][0] for j in range(4)}
    for survivors in ([1, 2, 3], [0, 1, 2, 7]):
        with pytest.raises(ValueError, match="not among this client's holders"):
            clients[0].unmask(mine, survivors)
    assert sorted(clients[0].unmask(mine, [0, 1, 2])) == [0, 1, 2, 3]


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
    n, k, threshold = 10, 4, 3
    graph = neighbourhoods(range(n), k)
    rng = np.random.default_rng(1)
    inputs = {i: rng.integers(0, 1 << 12, LENGTH).astype(np.uint64) for i in range(n)}
    clients = {i: ClientSession(i, threshold, BITS, LENGTH, CONTEXT) for i in range(n)}
    publics = {i: c.advertise() for i, c in clients.items()}
    sealed = {i: clients[i].share({j: publics[j] for j in graph[i]}) for i in range(n)}
    masked = {i: clients[i].mask(inputs[i], graph[i]) for i in range(n) if i not in drop}
    revealed = [clients[i].unmask({j: sealed[j][i] for j in graph[i]}, [j for j in masked if j in graph[i]]) for i in masked]
    total = unmask_sum(masked, revealed, {i: publics[i][1] for i in range(n)}, {i: graph[i] for i in masked}, threshold, BITS, CONTEXT)
    assert (total == sum(inputs[i] for i in masked) % np.uint64(1 << BITS)).all()


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
            publics = {0: a.advertise(), 1: b.advertise()}
            a.share(publics)
            outputs.append(int(a.mask(np.array([value], dtype=np.uint64), [0, 1])[0]))
        sent[value] = np.array(outputs)
    for outputs in sent.values():
        assert stats.chisquare(np.bincount(outputs >> 12, minlength=16)).pvalue > 1e-4  # uniform top bits
    inputs = np.repeat([3, 60000], trials)
    assert abs(np.corrcoef(inputs, np.concatenate([sent[3], sent[60000]]))[0, 1]) < 0.1
    assert stats.ks_2samp(sent[3], sent[60000]).pvalue > 1e-4
