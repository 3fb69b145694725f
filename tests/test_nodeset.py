from __future__ import annotations

import pytest

from kasched.errors import InputError
from kasched.nodeset import expand, expand_many, expand_ordered, expand_value, fold


def test_expand_and_fold() -> None:
    assert expand("node-[1-3,7]") == ["node-1", "node-2", "node-3", "node-7"]
    assert expand("a[01-02],b") == ["a01", "a02", "b"]
    assert fold(["node-1", "node-2", "node-3", "node-7"]) == "node-[1-3,7]"
    assert expand_many(["n[1-2]", "n[2-3]"]) == ["n1", "n2", "n3"]


def test_ordered_values_follow_the_written_order() -> None:
    assert expand_ordered("n[3,1-2]") == ["n3", "n1", "n2"]
    assert expand_value("10.0.0.[9-11]", 3, field="ip") == ["10.0.0.9", "10.0.0.10", "10.0.0.11"]
    assert expand_value("same", 2, field="x") == ["same", "same"]


@pytest.mark.parametrize("bad", ["", "node-[3-1", "node-[a-b]", "[]"])
def test_bad_ranges(bad: str) -> None:
    with pytest.raises(InputError):
        expand(bad)


def test_value_count_mismatch() -> None:
    with pytest.raises(InputError, match="gives 2 values for 3 nodes"):
        expand_value("x[1-2]", 3, field="ip")
    with pytest.raises(InputError, match="only one"):
        expand_value("x[1-2][1-2]", 4, field="ip")


def test_fold_never_fails_on_odd_names() -> None:
    # Used in error messages about unknown nodes, whatever a client sent.
    assert fold(["a[", "b]c"]) == "a[,b]c"


def test_non_ascii_digits_are_refused() -> None:
    with pytest.raises(InputError, match="bad range"):
        expand_value("10.0.0.[\u00b9-2]", 2, field="ip")


def test_an_at_sign_is_a_character_not_a_group_lookup() -> None:
    """ClusterShell reads ``@name`` as a node group from the site's group files; kasched takes no
    groups (the fuzzer's ``c@x-`` made kaschedd answer 500 through GroupResolverSourceError)."""
    assert expand("c@x-") == ["c@x-"]
    assert sorted(expand("a,@g")) == ["@g", "a"]


def test_fold_writes_what_clustershell_writes_name_by_name() -> None:
    """fold() hands ClusterShell ranges of the plain names instead of every name: the text must be the
    one ClusterShell makes from the names one by one, padded, odd and invalid names included."""
    import random

    from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet

    def one_by_one(names: list[str]) -> str:
        try:
            return str(NodeSet.fromlist(names, resolver=RESOLVER_NOGROUP))
        except Exception:
            return ",".join(names)

    pool = [f"node-{i}" for i in range(40)] + [f"n{i:03d}" for i in range(12)] + [f"r1-n{i}" for i in range(8)]
    pool += ["x", "abc-", "1", "12", "node-0", "n-007", "a.b-3", "@g", "x!y", "z[1]", "node-1-2", "node1a", "0"]
    draw = random.Random(20)
    for _ in range(2000):
        names = draw.sample(pool, draw.randint(1, 25))
        assert fold(names) == one_by_one(names), names
    assert fold([]) == ""
    assert fold(f"n-{i}" for i in [*range(5000), *range(5001, 10001)]) == "n-[0-4999,5001-10000]"
