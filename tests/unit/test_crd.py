"""The CRD is generated from the models; the committed copy must match."""

from llm2llm.crd import crd, crd_yaml
from tests.conftest import REPO


def test_committed_crd_is_current():
    committed = (REPO / "crds" / "llm2llm.io_augmentationruns.yaml").read_text()
    assert committed == crd_yaml(), "crds/ is stale: run `make crds`"


def test_crd_shape():
    c = crd()
    v = c["spec"]["versions"][0]
    assert c["spec"]["names"]["shortNames"][0] == "augrun"
    assert v["subresources"] == {"status": {}}
    assert [col["name"] for col in v["additionalPrinterColumns"]] == [
        "Phase", "Iteration", "Seed-Acc", "Test-Acc", "Augmented", "Age"]
    spec = v["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["data", "output"]
    assert spec["properties"]["loop"]["properties"]["maxIterations"]["minimum"] == 1
    assert spec["properties"]["student"]["default"] == {}
    assert len(spec["x-kubernetes-validations"]) >= 5
    # Structural: every node typed (the API server would refuse the CRD otherwise).
    def walk(node):
        assert "type" in node or "x-kubernetes-preserve-unknown-fields" in node, node
        for child in node.get("properties", {}).values():
            walk(child)
        if isinstance(node.get("items"), dict):
            walk(node["items"])
    walk(v["schema"]["openAPIV3Schema"])
