#!/usr/bin/env bash
# The whole flow with curl against a running server (`make run`): upload an archive, start a
# Self-Tuning run on the default offline backbone, follow its live events, fetch the results,
# download the checkpoint, and check that plain timm reproduces the reported test accuracy.
#
#   bench/curl_flow.sh [ARCHIVE]          (default: ../shared/datasets/animal-mnist.zip)
#   BASE=http://127.0.0.1:8000 BUDGET=0.05 ITERATIONS=400 TOKEN=... bench/curl_flow.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-http://127.0.0.1:8000}
ARCHIVE=${1:-../shared/datasets/animal-mnist.zip}
BUDGET=${BUDGET:-0.05}
ITERATIONS=${ITERATIONS:-400}
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
AUTH=()
[ -n "${TOKEN:-}" ] && AUTH=(-H "Authorization: Bearer $TOKEN")
json() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

echo "1. upload $ARCHIVE"
curl -sSf "${AUTH[@]}" -F "file=@$ARCHIVE" -F "name=$(basename "$ARCHIVE")" \
  "$BASE/api/datasets" > "$WORK/dataset.json"
DATASET=$(json 'd["id"]' < "$WORK/dataset.json")
json '"   dataset %s: %d classes, %d train, %d test, %d unlabeled" % (d["id"], len(d["classes"]), sum(c["train"] for c in d["classes"]), sum(c["test"] for c in d["classes"]), d["unlabeled"])' < "$WORK/dataset.json"

echo "2. start Self-Tuning at budget $BUDGET, $ITERATIONS iterations (quick preset)"
curl -sSf "${AUTH[@]}" -H 'Content-Type: application/json' "$BASE/api/experiments" -d "{
  \"dataset_id\": $DATASET, \"methods\": [\"self-tuning\"], \"budgets\": [$BUDGET],
  \"seeds\": [0], \"preset\": \"quick\", \"overrides\": {\"iterations\": $ITERATIONS}}" \
  > "$WORK/experiment.json"
RUN=$(json 'd["runs"][0]["id"]' < "$WORK/experiment.json")
echo "   run $RUN queued"

echo "3. follow the live events (Server-Sent Events) until the end"
read -r -d '' FOLLOW <<'PY' || true
import json, sys
for line in sys.stdin:
    if not line.startswith("data: "):
        continue
    e = json.loads(line[6:])
    if e["type"] == "eval":
        print(f"   step {e['step']}/{e['total_steps']}: test top-1 {e['test_top1']:.3f}")
    elif e["type"] == "progress" and e["step"] % 100 == 0:
        print(f"   step {e['step']}/{e['total_steps']}  {e.get('images_per_s', 0):.0f} img/s")
    elif e["type"] == "end":
        print(f"   end: {e['status']}")
        break
PY
curl -sSN "${AUTH[@]}" "$BASE/api/runs/$RUN/events" | "$PY" -u -c "$FOLLOW"

echo "4. results"
curl -sSf "${AUTH[@]}" "$BASE/api/runs/$RUN" > "$WORK/run.json"
json '"   status %s, test top-1 %.4f, mean per-class %.4f, pseudo-label acc %s" % (d["status"], d["metrics"]["test_top1"], d["metrics"]["test_mean_class_acc"], d["metrics"].get("pseudo_label_acc"))' < "$WORK/run.json"
curl -sSf "${AUTH[@]}" -o "$WORK/label-next.csv" "$BASE/api/runs/$RUN/label-next.csv"
FIRST=$(sed -n 2p "$WORK/label-next.csv")
if [ -n "$FIRST" ]; then
  echo "   unlabeled image to label first (smallest margin): $FIRST"
else
  echo "   no unlabeled image to rank (the dataset and budget leave none)"
fi

echo "5. download the checkpoint and load it with plain timm; score the dataset's test split"
curl -sSf "${AUTH[@]}" -o "$WORK/checkpoint.zip" "$BASE/api/runs/$RUN/checkpoint"
# The test split as the app stores it (the upload's test/ folder, or its hold-out): the
# dataset's own download, a tar of its images and a labels.csv of their labels and splits.
curl -sSf "${AUTH[@]}" -o "$WORK/dataset.tar" "$BASE/api/datasets/$DATASET/archive"
"$PY" - "$WORK" <<'PY'
import csv, io, json, sys, tarfile, zipfile
import timm, torch
from PIL import Image

work = sys.argv[1]
zipfile.ZipFile(f"{work}/checkpoint.zip").extractall(f"{work}/ckpt")
config = json.load(open(f"{work}/ckpt/config.json"))
model = timm.create_model(
    config["architecture"], pretrained=True, num_classes=config["num_classes"],
    pretrained_cfg_overlay=dict(file=f"{work}/ckpt/model.safetensors", **config["pretrained_cfg"]),
).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
names = config["label_names"]
correct = total = 0
with tarfile.open(f"{work}/dataset.tar") as source:
    listed = next(m for m in source.getmembers() if m.name.endswith("/labels.csv"))
    folder = listed.name.rsplit("/", 1)[0]
    rows = csv.DictReader(io.TextIOWrapper(source.extractfile(listed), encoding="utf-8"))
    tests = [(row["path"], row["label"]) for row in rows if row["split"] == "test"]
    for start in range(0, len(tests), 64):
        chunk = tests[start:start + 64]
        batch = torch.stack([
            transform(Image.open(source.extractfile(f"{folder}/{path}")).convert("RGB"))
            for path, _ in chunk])
        with torch.no_grad():
            predicted = model(batch).argmax(1).tolist()
        for (_, label), index in zip(chunk, predicted):
            correct += names[index] == label
            total += 1
reported = json.load(open(f"{work}/run.json"))["metrics"]["test_top1"]
print(f"   plain timm on {total} test images: {correct / total:.4f} (run reported {reported:.4f})")
sys.exit(0 if abs(correct / total - reported) < 1e-9 else 1)
PY
echo "done: the downloaded model reproduces the reported accuracy"
