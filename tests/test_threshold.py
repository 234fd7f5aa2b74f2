"""Threshold BFV (crypto/threshold.py) with real OpenFHE: a 3-of-5 committee, sums that decrypt
only with every share, a quorum standing in for members that dropped out, and loud failures
below the quorum."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import threshold
from crypto.threshold import ThresholdError
from tests.helpers import needs_openfhe

needs_openfhe()

MEMBERS, QUORUM = 5, 3


@pytest.fixture(scope="module")
def committee():
    context = threshold.new_context()
    shares, public = [], None
    for member in range(MEMBERS):
        share = threshold.make_share(context, member, public)
        shares.append(share)
        public = share.public
    backups = [threshold.back_up(share, MEMBERS, QUORUM) for share in shares]
    return context, shares, public, backups


@pytest.fixture(scope="module")
def updates(committee):
    context, _, joint, _ = committee
    rng = np.random.default_rng(0)
    clear = [rng.integers(0, 1 << 27, 9000) for _ in range(3)]  # three ciphertexts each (4096 slots)
    return clear, [threshold.encrypt(context, joint, u) for u in clear]


def decrypt_with(context, shares, ciphertexts) -> dict[int, list[bytes]]:
    return {s.member: threshold.partial_decrypt(context, s, ciphertexts) for s in shares}


def test_the_committee_decrypts_the_sum_and_only_the_sum(committee, updates):
    context, shares, _, _ = committee
    clear, encrypted = updates
    assert len(encrypted[0]) == 3
    total = threshold.add(context, encrypted)
    values = threshold.fuse(context, decrypt_with(context, shares, total), MEMBERS, 9000)
    np.testing.assert_array_equal(values, np.sum(clear, axis=0))  # exact: BFV adds integers


@settings(max_examples=15, deadline=None)
@given(terms=st.integers(1, 8), length=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1))
def test_any_sum_that_fits_sum_bits_decrypts_exactly(committee, terms, length, seed):
    """Sums of up to ``terms`` values below 2**SUM_BITS / terms: the fixed-point encodings the
    mode sends, at every length (partial last ciphertext included)."""
    context, shares, joint, _ = committee
    rng = np.random.default_rng(seed)
    clear = [rng.integers(0, (1 << threshold.SUM_BITS) // terms, length) for _ in range(terms)]
    total = threshold.add(context, [threshold.encrypt(context, joint, values) for values in clear])
    fused = threshold.fuse(context, decrypt_with(context, shares, total), MEMBERS, length)
    np.testing.assert_array_equal(fused, np.sum(clear, axis=0))


@pytest.mark.parametrize("holders", [[0], [0, 1], [0, 3]], ids=["one member", "t-1 with the lead", "another t-1"])
def test_fewer_than_every_share_cannot_decrypt_an_update_or_the_sum(committee, updates, holders):
    """The refusal, and why it matters: forced through OpenFHE anyway, partials from a subset
    fuse to noise, for one client's update as for the aggregate."""
    context, shares, _, _ = committee
    clear, encrypted = updates
    total = threshold.add(context, encrypted)
    with pytest.raises(ThresholdError, match=f"from {len(holders)} of 5 key holders"):
        threshold.fuse(context, decrypt_with(context, [shares[m] for m in holders], total), MEMBERS, 9000)
    of = threshold.openfhe()
    cc = threshold._context(context)
    for ciphertexts, expected in ((encrypted[0], clear[0]), (total, np.sum(clear, axis=0))):
        partials = decrypt_with(context, [shares[m] for m in holders], ciphertexts[:1])
        plaintext = cc.MultipartyDecryptFusion([of.DeserializeCiphertextString(p[0], of.BINARY) for p in partials.values()])
        plaintext.SetLength(threshold.SLOTS)
        values = np.mod(np.asarray(plaintext.GetPackedValue(), dtype=np.int64), threshold.PLAINTEXT_MODULUS)
        wrong = values != expected[: threshold.SLOTS]
        assert wrong.mean() > 0.99  # noise: uniform over the plaintext space, not the values
        assert np.median(values) > 1 << 28  # the values are below 2**27 (2**29 for the sum of three)


def test_a_quorum_decrypts_after_the_others_drop_out(committee, updates):
    """Members 3 and 4 vanish (n - t = 2): members 0-2 pool their Shamir shares of each missing
    member's sealing key, open its key share, and decrypt in its place."""
    context, shares, _, backups = committee
    clear, encrypted = updates
    total = threshold.add(context, encrypted)
    present = [0, 1, 2]
    partials = decrypt_with(context, [shares[m] for m in present], total)
    for missing in (3, 4):
        backup = backups[missing]
        recovered = threshold.recover_share(backup.sealed, missing, [backup.shares[m] for m in present], QUORUM)
        assert recovered == shares[missing]
        partials[missing] = threshold.partial_decrypt(context, recovered, total)
    values = threshold.fuse(context, partials, MEMBERS, 9000)
    np.testing.assert_array_equal(values, np.sum(clear, axis=0))


def test_below_the_quorum_recovery_fails_loudly(committee):
    _, _, _, backups = committee
    backup = backups[4]
    with pytest.raises(ThresholdError, match="2 distinct shares, 3 needed"):
        threshold.recover_share(backup.sealed, 4, [backup.shares[0], backup.shares[1]], QUORUM)
    wrong = backups[3].shares[2]  # another member's key's share: same size, wrong secret
    with pytest.raises(ThresholdError, match="did not open"):
        threshold.recover_share(backup.sealed, 4, [backup.shares[0], backup.shares[1], wrong], QUORUM)
    with pytest.raises(ThresholdError, match="did not open"):  # a backup opened as another member's
        threshold.recover_share(backup.sealed, 3, [backup.shares[m] for m in (0, 1, 2)], QUORUM)


def test_bad_input_is_named(committee, updates):
    context, shares, joint, _ = committee
    _, encrypted = updates
    with pytest.raises(ThresholdError, match="not a serialized OpenFHE ciphertext"):
        threshold.add(context, [encrypted[0], [b"garbage"] * 3])
    with pytest.raises(ThresholdError, match="different numbers of ciphertexts"):
        threshold.add(context, [encrypted[0], encrypted[1][:2]])
    with pytest.raises(ThresholdError, match="not a serialized OpenFHE public key"):
        threshold.encrypt(context, b"not a key", np.zeros(3, dtype=np.int64))
    for values in (np.zeros(3), np.array([-1, 0]), np.array([1 << threshold.SUM_BITS])):
        with pytest.raises(ThresholdError, match="encode values with crypto.fixedpoint"):
            threshold.encrypt(context, joint, values)
    threshold.check_ciphertexts(context, encrypted[0], 9000)
    with pytest.raises(ThresholdError, match="2 ciphertexts, 3 expected for 9000 values"):
        threshold.check_ciphertexts(context, encrypted[0][:2], 9000)
    with pytest.raises(ThresholdError, match="not a serialized OpenFHE ciphertext"):
        threshold.check_ciphertexts(context, [b"x" * 100] * 3, 9000)
    with pytest.raises(ThresholdError, match="first member starts the chain"):
        threshold.make_share(context, 2, None)
    with pytest.raises(ThresholdError, match="quorum 6 must be between 1 and the committee's 5"):
        threshold.back_up(shares[0], MEMBERS, 6)


def test_without_openfhe_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "openfhe", None)
    with pytest.raises(ImportError, match=r"fedlearn\[threshold\]"):
        threshold.openfhe()


# -- committee members, as a node runs them (no Flower) -----------------------------------------
def ceremony(members: int = MEMBERS, quorum: int = QUORUM) -> tuple[bytes, list[threshold.CommitteeMember], bytes, list[bytes]]:
    """What server/threshold.py does over messages: join, keygen in turn, hand out the shares;
    each member travels through its serialized state between steps, as on a node."""
    context = threshold.new_context()
    nodes = [threshold.CommitteeMember.join("c1") for _ in range(members)]
    peers = [m.public_agreement_key() for m in nodes]
    public, inbox, sealed_backups = None, {j: {} for j in range(members)}, []
    for i, node in enumerate(nodes):
        public, sealed, shares = node.make_key(context, i, quorum, public, peers)
        sealed_backups.append(sealed)
        for j, blob in enumerate(shares):
            if j != i:
                inbox[j][i] = blob
    nodes = [threshold.CommitteeMember.from_state(n.to_state()) for n in nodes]
    for j, node in enumerate(nodes):
        node.hold(inbox[j], peers)
    return context, [threshold.CommitteeMember.from_state(n.to_state()) for n in nodes], public, sealed_backups


def test_a_ceremony_between_members_decrypts_and_recovers_a_missing_member():
    context, nodes, joint, sealed = ceremony()
    values = np.arange(5000, dtype=np.int64)
    total = threshold.add(context, [threshold.encrypt(context, joint, values)] * 2)
    partials = {n.member: n.partial_decrypt(context, total) for n in nodes[:4]}
    revealed = [n.reveal([4]) for n in nodes[:QUORUM]]  # member 4 is gone
    recovered = threshold.recover_share(sealed[4], 4, [r[4] for r in revealed], QUORUM)
    partials[4] = threshold.partial_decrypt(context, recovered, total)
    np.testing.assert_array_equal(threshold.fuse(context, partials, MEMBERS, 5000), 2 * values)


def test_a_member_reveals_for_at_most_committee_minus_quorum_members_and_never_itself():
    _, nodes, _, _ = ceremony()
    member = nodes[0]
    with pytest.raises(ThresholdError, match="asked to reveal its own"):
        member.reveal([0, 3])
    member.reveal([3])
    member.reveal([3, 4])  # 4 is the second of the n - t = 2 it may lose
    with pytest.raises(ThresholdError, match="would make 3 recovered key shares, more than the 2"):
        member.reveal([2])
    assert threshold.CommitteeMember.from_state(member.to_state()).revealed == (3, 4)  # kept across messages


def test_a_member_refuses_a_ceremony_that_is_not_its_own():
    context = threshold.new_context()
    a, b = threshold.CommitteeMember.join("c1"), threshold.CommitteeMember.join("c1")
    peers = [a.public_agreement_key(), b.public_agreement_key()]
    with pytest.raises(ThresholdError, match="another agreement key as member 1"):
        a.make_key(context, 1, 2, None, peers)  # the server placed someone else's key at a's place
    with pytest.raises(ThresholdError, match="quorum 1 of 2"):
        a.make_key(context, 0, 1, None, peers)
    public, _, shares = a.make_key(context, 0, 2, None, peers)
    _, _, back = b.make_key(context, 1, 2, public, peers)
    with pytest.raises(ThresholdError, match="already holds the key share of member 0"):
        a.make_key(context, 0, 2, None, peers)
    with pytest.raises(ThresholdError, match="sealed by member 1 did not open"):
        a.hold({1: shares[1]}, peers)  # a's own share for b, not b's for a
    a.hold({1: back[0]}, peers)
