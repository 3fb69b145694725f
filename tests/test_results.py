"""One per-node result type: NodeResult in a GroupResult, whose grouped view folds nodes with identical
outcomes into node sets (as clubak -b folds identical output)."""

from __future__ import annotations

from kasched.deploy.operations import OperationResult
from kasched.results import GroupResult, NodeGroup, NodeResult


def test_identical_outcomes_fold_into_one_node_set() -> None:
    group = GroupResult()
    for index in range(1, 10001):
        failed = index % 1000 == 0
        group.add(NodeResult(f"node-{index}", not failed, "boot", "did not come back" if failed else None))
    group.add(NodeResult("node-10001", False, "broadcast", "sha256 mismatch"))
    assert group.grouped() == [
        NodeGroup("node-[1-999,1001-1999,2001-2999,3001-3999,4001-4999,5001-5999,6001-6999,7001-7999,"
                  "8001-8999,9001-9999]", 9990, True, "boot", None),
        NodeGroup("node-[1000,2000,3000,4000,5000,6000,7000,8000,9000,10000]", 10, False, "boot",
                  "did not come back"),
        NodeGroup("node-10001", 1, False, "broadcast", "sha256 mismatch"),
    ]  # fmt: skip


def test_an_operations_ok_is_a_bool_as_a_groups_is() -> None:
    results = GroupResult({"n1": NodeResult("n1", True, "boot"), "n2": NodeResult("n2", False, "boot", "x")})
    operation = OperationResult("d1", "deploy", "failed", results)
    assert operation.ok is False and results.ok is False
    assert (operation.succeeded, operation.failed) == (["n1"], ["n2"])
    assert operation.results["n2"].as_dict()["error"] == "x"
