"""Frame dataset builder and reader on a synthetic EchoNet folder: counts, pixels, flags, resume, bad input."""

import ast
import csv
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.data.frame_builder as builder
from pipelines.data.frame_builder import build_frame_dataset, push_frame_dataset
from pipelines.data.frame_reader import FrameDataset, load_frames
from pipelines.data.synthetic_echonet import write_synthetic_echonet

REPO = Path(__file__).resolve().parents[1]

SPLITS = {"TRAIN": "train", "VAL": "validation", "TEST": "test"}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def decode_gray(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    return np.stack(frames)


def shoelace_area(trace):
    chords = np.array(trace[1:])
    pts = np.concatenate([chords[:, :2], chords[::-1, 2:]])
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def rows_of(dd):
    return {split: [dict(r) for r in dd[split]] for split in dd}


@pytest.fixture(scope="module")
def echonet(tmp_path_factory):
    return write_synthetic_echonet(tmp_path_factory.mktemp("echonet") / "EchoNet-Dynamic", num_videos=8, seed=11,
                                   num_workers=1, num_frames=(12, 23))


@pytest.fixture(scope="module")
def built(echonet, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "frames"
    return out, build_frame_dataset(echonet, out, num_workers=0, progress=False, verbose=False)


def copy_echonet(echonet, tmp_path):
    dst = tmp_path / "EchoNet-Dynamic"
    shutil.copytree(echonet, dst)
    return dst


def test_splits_counts_resolution(echonet, built):
    out, dd = built
    filelist = read_rows(echonet / "FileList.csv")
    assert set(dd) == {"train", "validation", "test"}
    summary = json.loads((out / "build_summary.json").read_text())
    for split in dd:
        videos = [r for r in filelist if SPLITS[r["Split"]] == split]
        expected = sum(math.ceil(int(r["NumberOfFrames"]) / 5) for r in videos)
        assert dd[split].num_rows == expected == summary["splits"][split]["frames"]
        assert set(dd[split]["video_id"]) == {r["FileName"] for r in videos}
        assert set(dd[split]["split"]) == {split}
        for r in videos:  # patient-level: each video's frames, all in its split, indices 0, 5, 10, ...
            idx = sorted(i for v, i in zip(dd[split]["video_id"], dd[split]["frame_index"]) if v == r["FileName"])
            assert idx == list(range(0, int(r["NumberOfFrames"]), 5))
    assert summary["total_frames"] == sum(math.ceil(int(r["NumberOfFrames"]) / 5) for r in filelist)
    assert summary["counts"] == {"built": 8, "bad": 0, "excluded_by_split": 0, "excluded_by_max_videos": 0}
    assert all(im.size == (64, 64) and im.mode == "L" for im in dd["train"]["image"])
    assert "synthetic" in (out / "README.md").read_text()  # the fixture's videos are synthetic


def test_pixels_match_an_independent_decode(echonet, built, tmp_path):
    _, dd = built
    row = dd["train"][1]
    frames = decode_gray(echonet / "Videos" / f"{row['video_id']}.avi")
    expected = np.asarray(Image.fromarray(frames[row["frame_index"]]).resize((64, 64), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(row["image"]), expected)
    assert row["EF"] == pytest.approx(float(next(r["EF"] for r in read_rows(echonet / "FileList.csv")
                                                 if r["FileName"] == row["video_id"])), rel=1e-6)
    # Native 112 with area filter: no resizing happens, frames are the decoded ones.
    native = build_frame_dataset(echonet, tmp_path / "native", resolution=112, frame_stride=5, resize_filter="area",
                                 splits=["validation"], num_workers=0, progress=False, verbose=False)
    assert set(native) == {"validation"}
    first = native["validation"][0]
    frames = decode_gray(echonet / "Videos" / f"{first['video_id']}.avi")
    assert np.array_equal(np.asarray(first["image"]), frames[first["frame_index"]])


def test_traced_frame_flags(echonet, built, tmp_path):
    traces = {}
    for r in read_rows(echonet / "VolumeTracings.csv"):
        traces.setdefault(r["FileName"][:-4], {}).setdefault(int(r["Frame"]), []).append(
            [float(r[c]) for c in ("X1", "Y1", "X2", "Y2")])
    truth = {}
    for video, frames in traces.items():
        by_area = sorted(frames, key=lambda f: shoelace_area(frames[f]))
        truth[video] = (by_area[-1], by_area[0])  # (end-diastolic, end-systolic)
    every = build_frame_dataset(echonet, tmp_path / "all", resolution=8, frame_stride=1, num_workers=0,
                                progress=False, verbose=False)
    for split in every:
        d = every[split]
        for video, index, is_ed, is_es in zip(d["video_id"], d["frame_index"], d["is_ed_frame"], d["is_es_frame"]):
            assert is_ed == (index == truth[video][0]) and is_es == (index == truth[video][1])
    _, dd = built
    for split in dd:
        d = dd[split]
        for video, index, is_ed, is_es in zip(d["video_id"], d["frame_index"], d["is_ed_frame"], d["is_es_frame"]):
            assert is_ed == (index == truth[video][0]) and is_es == (index == truth[video][1])


def test_frame_dataset_access(built):
    out, dd = built
    ds = FrameDataset(out, split="train")
    assert (ds.resolution, ds.channels, len(ds)) == (64, 1, dd["train"].num_rows)
    item = ds[3]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 64, 64)
    assert np.array_equal(item["image"][0].numpy(), np.asarray(dd["train"][3]["image"]))
    assert item["video_id"] == dd["train"][3]["video_id"] and item["frame_index"] == dd["train"][3]["frame_index"]
    bulk = ds.images_uint8()
    assert bulk.shape == (len(ds), 1, 64, 64) and bulk.dtype == np.uint8
    assert np.array_equal(bulk[3], item["image"].numpy())
    assert np.array_equal(ds.images_uint8([5, 2]), bulk[[5, 2]])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=6, shuffle=False)))
    assert torch.equal(batch["image"], torch.from_numpy(bulk[:6]))
    assert batch["EF"].shape == (6,) and len(batch["video_id"]) == 6
    rgb = FrameDataset(out, split="validation", channels=3)
    assert rgb[0]["image"].shape == (3, 64, 64) and torch.equal(rgb[0]["image"][0], rgb[0]["image"][2])
    assert rgb.images_uint8().shape[1] == 3


def test_load_frames_reads_several_splits_as_one(built):
    out, dd = built
    parts = {split: FrameDataset(out, split=split) for split in ("train", "validation", "test")}
    every = load_frames(out, "all")
    assert len(every) == sum(len(p) for p in parts.values()) and every.split == "all"
    assert every.source == str(out.resolve()) and (every.resolution, every.channels) == (64, 1)
    np.testing.assert_array_equal(every.images_uint8(), np.concatenate([p.images_uint8() for p in parts.values()]))
    two = load_frames(out, "test, train")
    n_test = len(parts["test"])
    np.testing.assert_array_equal(two.images_uint8([n_test + 2, 1]),
                                  np.stack([parts["train"].images_uint8([2])[0], parts["test"].images_uint8([1])[0]]))
    assert two.column("video_id").tolist() == [*dd["test"]["video_id"], *dd["train"]["video_id"]]
    assert isinstance(load_frames(out, "validation"), FrameDataset)
    with pytest.raises(ValueError, match="split must name a split"):
        load_frames(out, " , ")


def test_builder_stands_apart_from_the_synthetic_generator():
    """Shared things live in pipelines.data.layout; no module takes another's private names."""
    for path in (REPO / "pipelines" / "data").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not any(alias.name.startswith("_") for alias in node.names), f"{path.name}: {ast.dump(node)}"
                if path.name == "frame_builder.py":
                    assert "synthetic_echonet" not in (node.module or ""), "the builder imports the generator"


def test_frame_dataset_errors(built, tmp_path):
    out, _ = built
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        FrameDataset(tmp_path / "no-such-folder")
    with pytest.raises(KeyError, match="valid'.*available splits"):
        FrameDataset(out, split="valid")
    with pytest.raises(ValueError, match="channels"):
        FrameDataset(out, channels=2)


def test_overwrite_refusal(echonet, built, tmp_path):
    out, dd = built
    with pytest.raises(FileExistsError, match="overwrite"):
        build_frame_dataset(echonet, out, num_workers=0, progress=False, verbose=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        build_frame_dataset(echonet, foreign, num_workers=0, overwrite=True, progress=False, verbose=False)
    assert (foreign / "notes.txt").exists()
    again = tmp_path / "again"
    build_frame_dataset(echonet, again, max_videos=2, num_workers=0, progress=False, verbose=False)
    rebuilt = build_frame_dataset(echonet, again, num_workers=0, overwrite=True, progress=False, verbose=False)
    assert rows_of(rebuilt) == rows_of(dd)


def test_resume_after_interruption(echonet, built, tmp_path, monkeypatch):
    _, reference = built
    out = tmp_path / "resumed"
    original = builder.process_video
    calls = []

    def interrupted_after_three(task):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(task["video_id"])
        return original(task)

    monkeypatch.setattr(builder, "process_video", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        build_frame_dataset(echonet, out, num_workers=0, progress=False, verbose=False)
    cache = out / "_work" / "videos"
    assert sorted(p.stem for p in cache.glob("*.json")) == sorted(calls)
    assert sorted(p.stem for p in cache.glob("*.npy")) == sorted(calls)
    with pytest.raises(ValueError, match="resolution"):
        build_frame_dataset(echonet, out, resolution=32, num_workers=0, progress=False, verbose=False)

    redone = []

    def counting(task):
        redone.append(task["video_id"])
        return original(task)

    monkeypatch.setattr(builder, "process_video", counting)
    resumed = build_frame_dataset(echonet, out, num_workers=0, progress=False, verbose=False)
    assert len(redone) == 8 - 3 and not set(redone) & set(calls)
    assert rows_of(resumed) == rows_of(reference)
    assert not (out / "_work").exists()


def test_parallel_build_equals_serial(echonet, built, tmp_path):
    _, reference = built
    parallel = build_frame_dataset(echonet, tmp_path / "par", num_workers=2, progress=False, verbose=False)
    assert rows_of(parallel) == rows_of(reference)


def test_options_splits_and_max_videos(echonet, tmp_path):
    filelist = read_rows(echonet / "FileList.csv")
    dd = build_frame_dataset(echonet, tmp_path / "val", splits=["val"], num_workers=0, progress=False, verbose=False)
    summary = json.loads((tmp_path / "val" / "build_summary.json").read_text())
    n_val = sum(r["Split"] == "VAL" for r in filelist)
    assert set(dd) == {"validation"} and summary["counts"]["excluded_by_split"] == 8 - n_val
    build_frame_dataset(echonet, tmp_path / "three", max_videos=3, num_workers=0, progress=False, verbose=False)
    summary = json.loads((tmp_path / "three" / "build_summary.json").read_text())
    assert summary["counts"]["built"] == 3 and summary["counts"]["excluded_by_max_videos"] == 5
    with pytest.raises(ValueError, match="resize_filter"):
        build_frame_dataset(echonet, tmp_path / "f", resize_filter="fancy")
    with pytest.raises(ValueError, match="splits"):
        build_frame_dataset(echonet, tmp_path / "s", splits=["holdout"])


def test_missing_or_misnamed_inputs(echonet, tmp_path):
    with pytest.raises(FileNotFoundError, match="echonet_dir=.*nowhere"):
        build_frame_dataset(tmp_path / "nowhere", tmp_path / "o1")
    src = copy_echonet(echonet, tmp_path)
    (src / "Videos").rename(src / "videos")
    with pytest.raises(FileNotFoundError, match="'Videos'.*found 'videos'"):
        build_frame_dataset(src, tmp_path / "o2")
    (src / "videos").rename(src / "Videos")
    (src / "VolumeTracings.csv").rename(src / "Tracings.csv")
    with pytest.raises(FileNotFoundError, match="VolumeTracings.csv"):
        build_frame_dataset(src, tmp_path / "o3")
    (src / "Tracings.csv").rename(src / "VolumeTracings.csv")
    rows = read_rows(src / "FileList.csv")
    write_rows(src / "FileList.csv", [{("Splits" if k == "Split" else k): v for k, v in r.items()} for r in rows])
    with pytest.raises(ValueError, match=r"FileList.csv: missing column\(s\) \['Split'\]"):
        build_frame_dataset(src, tmp_path / "o4")


def test_bad_videos_skipped_and_reported(echonet, tmp_path):
    src = copy_echonet(echonet, tmp_path)
    rows = read_rows(src / "FileList.csv")
    videos = src / "Videos"
    names = [r["FileName"] for r in rows]
    (videos / f"{names[0]}.avi").write_bytes(b"not a video at all" * 100)           # unreadable
    data = (videos / f"{names[1]}.avi").read_bytes()
    (videos / f"{names[1]}.avi").write_bytes(data[: len(data) // 2])                 # truncated
    writer = cv2.VideoWriter(str(videos / f"{names[2]}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 50.0, (112, 112))
    writer.release()                                                                 # zero frames
    (videos / f"{names[3]}.avi").unlink()                                            # missing
    rows[4]["FrameHeight"] = "100"                                                   # size disagrees
    rows[5]["NumberOfFrames"] = str(int(rows[5]["NumberOfFrames"]) + 3)              # count disagrees
    write_rows(src / "FileList.csv", rows)

    out = tmp_path / "frames"
    with pytest.raises(RuntimeError, match="6 of 8 videos are unusable"):
        build_frame_dataset(src, out, num_workers=0, max_bad_fraction=0.5, progress=False, verbose=False)
    assert json.loads((out / "build_summary.json").read_text())["status"] == "failed"

    dd = build_frame_dataset(src, out, num_workers=0, max_bad_fraction=0.8, progress=False, verbose=False)
    summary = json.loads((out / "build_summary.json").read_text())
    reasons = {b["file"]: b["reason"] for b in summary["bad_videos"]}
    assert reasons.keys() == {f"Videos/{n}.avi" for n in names[:6]}
    assert "unreadable" in reasons[f"Videos/{names[0]}.avi"]
    assert "FileList NumberOfFrames" in reasons[f"Videos/{names[1]}.avi"]
    assert "zero frames" in reasons[f"Videos/{names[2]}.avi"]
    assert "not found" in reasons[f"Videos/{names[3]}.avi"]
    assert "FrameHeight" in reasons[f"Videos/{names[4]}.avi"]
    assert "NumberOfFrames is" in reasons[f"Videos/{names[5]}.avi"]
    assert sum(summary["counts"].values()) == summary["filelist_rows"] == 8
    assert summary["counts"]["built"] == 2
    built_ids = {v for split in dd for v in dd[split]["video_id"]}
    assert built_ids == set(names[6:])
    assert summary["total_frames"] == sum(math.ceil(int(r["NumberOfFrames"]) / 5) for r in rows[6:])


def test_push_needs_explicit_agreement(built):
    out, _ = built
    with pytest.raises(PermissionError, match="research-use agreement"):
        push_frame_dataset(out, "someone/echonet-frames", api=object())


def test_command_lines(tmp_path, capsys):
    import build_echonet_frames
    import make_synthetic_echonet

    src = make_synthetic_echonet.main(["--output_dir", str(tmp_path / "syn"), "--num_videos", "3", "--seed", "5",
                                       "--min_frames", "10", "--max_frames", "12", "--num_workers", "1"])
    assert len(read_rows(src / "FileList.csv")) == 3
    dd = build_echonet_frames.main(["--echonet_dir", str(src), "--output_dir", str(tmp_path / "frames"), "--resolution", "32",
                                    "--num_workers", "1"])
    assert "total" in capsys.readouterr().out
    assert FrameDataset(tmp_path / "frames", split="train").resolution == 32
    assert sum(dd[s].num_rows for s in dd) == sum(math.ceil(int(r["NumberOfFrames"]) / 5)
                                                for r in read_rows(src / "FileList.csv"))
    with pytest.raises(SystemExit):
        build_echonet_frames.main(["--echonet_dir", str(src), "--output_dir", str(tmp_path / "f2"), "--push_to_hub", "a/b"])


def test_image_column_reads_as_pil_images_everywhere(built, tmp_path):
    """What the Hub serves (parquet) loads through datasets' own reader as PIL images; the reader's
    fast path gives the same pixels."""
    import datasets

    out, dd = built
    assert isinstance(dd["train"].features["image"], datasets.Image)
    dd["train"].to_parquet(str(tmp_path / "train.parquet"))
    hub_like = datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "train.parquet")})
    first = hub_like["train"][0]["image"]
    assert isinstance(first, Image.Image) and first.mode == "L"
    assert isinstance(hub_like["train"].cast_column("image", datasets.Image())[1]["image"], Image.Image)
    fast = FrameDataset(out, split="train").images_uint8()
    assert np.array_equal(fast[:, 0], np.stack([np.asarray(im) for im in dd["train"]["image"]]))


def test_datasets_built_with_raw_bytes_still_read(built, tmp_path):
    import datasets

    out, dd = built
    pixels = np.stack([np.asarray(im) for im in dd["validation"]["image"]])
    old = dd["validation"].cast_column("image", datasets.Image(decode=False)).map(
        lambda row: {"raw": np.asarray(Image.open(__import__("io").BytesIO(row["image"]["bytes"]))).tobytes()},
        remove_columns=["image"]).rename_column("raw", "image")
    assert old.features["image"] == datasets.Value("binary")
    datasets.DatasetDict({"validation": old}).save_to_disk(str(tmp_path / "old"))
    reader = FrameDataset(tmp_path / "old", split="validation")
    assert reader.storage == "raw" and np.array_equal(reader.images_uint8()[:, 0], pixels)
    assert np.array_equal(reader[2]["image"][0].numpy(), pixels[2])


def test_build_records_what_the_frames_are(echonet, built, tmp_path):
    """The synthetic generator's marker makes the build (summary and card) say synthetic; without it, EchoNet."""
    from huggingface_hub import DatasetCard

    from pipelines.data.frame_reader import recorded_data_source

    out, _ = built
    assert recorded_data_source(out)["kind"] == "synthetic"
    card = DatasetCard((out / "README.md").read_text())
    assert card.data.license == "unknown" and "synthetic" in card.data.tags and "no patient data" in card.text
    real_like = copy_echonet(echonet, tmp_path)
    (real_like / "echodiff_synthetic.json").unlink()
    build_frame_dataset(real_like, tmp_path / "real", splits=["test"], num_workers=0, progress=False, verbose=False)
    assert recorded_data_source(tmp_path / "real") == {"kind": "echonet-dynamic"}
    card = DatasetCard((tmp_path / "real" / "README.md").read_text())
    assert (card.data.license, card.data.license_name) == ("other", "echonet-dynamic-research-use-agreement")
    assert card.data.license_link.startswith("https://echonet.github.io/dynamic")
    assert "research use agreement" in card.text and "synthetic" not in card.data.tags


class FakeDatasetHub:
    """Records the Hub calls of a dataset push; ``private`` is the visibility of an existing repo (None: none)."""

    def __init__(self, private):
        self.existing_private, self.calls = private, []

    def repo_info(self, repo_id, repo_type=None, **kwargs):
        from types import SimpleNamespace

        from huggingface_hub.errors import RepositoryNotFoundError

        self.calls.append(("repo_info", repo_id))
        if self.existing_private is None:
            import httpx

            url = f"https://huggingface.co/api/datasets/{repo_id}"
            raise RepositoryNotFoundError(f"{repo_id} not found",
                                          response=httpx.Response(404, request=httpx.Request("GET", url)))
        return SimpleNamespace(id=repo_id, private=self.existing_private)

    def create_repo(self, repo_id, private=None, **kwargs):
        self.calls.append(("create_repo", repo_id, private))
        self.existing_private = bool(private)

    def upload_file(self, *, path_in_repo, **kwargs):
        self.calls.append(("upload_file", path_in_repo))


def test_dataset_push_never_lands_echonet_frames_in_a_public_repo(echonet, tmp_path, monkeypatch):
    import datasets

    pushed = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo_id, **kw: pushed.append((repo_id, kw)))
    real_like = copy_echonet(echonet, tmp_path)
    (real_like / "echodiff_synthetic.json").unlink()
    out = tmp_path / "frames"
    build_frame_dataset(real_like, out, splits=["test"], num_workers=0, progress=False, verbose=False)

    public = FakeDatasetHub(private=False)  # an existing public repo: create_repo's private= would be ignored
    with pytest.raises(PermissionError, match="'someone/frames' is public"):
        push_frame_dataset(out, "someone/frames", agree_to_research_use_agreement=True, api=public)
    assert not any(c[0] == "upload_file" for c in public.calls) and not pushed
    with pytest.raises(PermissionError, match="private repository"):
        push_frame_dataset(out, "someone/frames", agree_to_research_use_agreement=True, private=False,
                           api=FakeDatasetHub(private=None))
    new = FakeDatasetHub(private=None)
    push_frame_dataset(out, "someone/frames", agree_to_research_use_agreement=True, api=new)
    assert ("create_repo", "someone/frames", True) in new.calls and pushed[-1][1]["private"] is True
    assert {c[1] for c in new.calls if c[0] == "upload_file"} == {"README.md", "build_summary.json"}
    push_frame_dataset(out, "someone/frames", agree_to_research_use_agreement=True, api=FakeDatasetHub(private=True))
    assert len(pushed) == 2
