"""Synthetic EchoNet-Dynamic-layout generator: layout, formats, physiology, determinism."""

import csv
import math

import cv2
import numpy as np
import pytest

from pipelines.data.synthetic_echonet import synthetic_frames, write_synthetic_echonet

FILELIST = ["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split"]
TRACINGS = ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def decode(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return np.stack(frames), fps


def tracings_by_video(rows):
    out = {}
    for name, x1, y1, x2, y2, frame in rows:
        out.setdefault(name, {}).setdefault(int(frame), []).append(tuple(map(float, (x1, y1, x2, y2))))
    return out


def polygon(trace):
    # EchoNet's own outline: chord starts down one side, chord ends back up the other.
    chords = np.array(trace[1:])
    return np.concatenate([chords[:, :2], chords[::-1, 2:]])


def disk_volume(trace):
    (x1, y1, x2, y2), chords = trace[0], np.array(trace[1:])
    diameters = np.hypot(chords[:, 2] - chords[:, 0], chords[:, 3] - chords[:, 1])
    return float(np.sum(np.pi / 4 * diameters**2) * math.hypot(x2 - x1, y2 - y1) / len(chords))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_synthetic_echonet(tmp_path_factory.mktemp("syn") / "echonet", num_videos=8, seed=3,
                                   num_workers=1, num_frames=(20, 30))


def test_layout_columns_and_videos(folder):
    header, rows = read_csv(folder / "FileList.csv")
    assert header == FILELIST
    assert len(rows) == 8
    assert {r[8] for r in rows} == {"TRAIN", "VAL", "TEST"}
    theader, trows = read_csv(folder / "VolumeTracings.csv")
    assert theader == TRACINGS
    assert sorted(p.name for p in (folder / "Videos").iterdir()) == sorted(r[0] + ".avi" for r in rows)
    for name, _ef, _esv, _edv, h, w, fps, n, _split in rows:
        assert not name.endswith(".avi") and name.startswith("0X") and len(name) == 18
        frames, decoded_fps = decode(folder / "Videos" / f"{name}.avi")
        # BGR 3-channel like EchoNet's clips, size and count as FileList says.
        assert frames.shape == (int(n), int(h), int(w), 3) == (int(n), 112, 112, 3)
        assert 20 <= int(n) <= 30
        assert decoded_fps == pytest.approx(float(fps), abs=0.01)
        # Black outside the fan: the top corners.
        assert frames[:, :8, :8].max() < 10 and frames[:, :8, -8:].max() < 10
        assert frames[:, 40:80, 40:80].mean() > 15


def test_volumes_consistent_with_tracings(folder):
    _, rows = read_csv(folder / "FileList.csv")
    traces = tracings_by_video(read_csv(folder / "VolumeTracings.csv")[1])
    for name, ef, esv, edv, *_rest in rows:
        ef, esv, edv = float(ef), float(esv), float(edv)
        assert 40 <= edv <= 280 and 0 < esv < edv
        assert ef == pytest.approx(100 * (edv - esv) / edv, rel=1e-9)
        frames = traces[name + ".avi"]
        assert len(frames) == 2 and all(len(t) == 21 for t in frames.values())
        first, second = list(frames)  # EchoNet lists end-systole (small) first
        v_es, v_ed = disk_volume(frames[first]), disk_volume(frames[second])
        assert v_es / v_ed == pytest.approx(esv / edv, rel=0.02)


def test_wall_motion_follows_tracings(folder):
    """Inside the end-diastolic LV outline it is dark (blood) at end-diastole, and brighter at
    end-systole because the walls have moved into that region."""
    _, rows = read_csv(folder / "FileList.csv")
    traces = tracings_by_video(read_csv(folder / "VolumeTracings.csv")[1])
    for name, *_rest in rows:
        frames, _ = decode(folder / "Videos" / f"{name}.avi")
        gray = frames[..., 1].astype(np.float64)
        es_frame, ed_frame = list(traces[name + ".avi"])
        mask = np.zeros((112, 112), np.uint8)
        cv2.fillPoly(mask, [np.round(polygon(traces[name + ".avi"][ed_frame])).astype(np.int32)], 1)
        inner = cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
        ring = (cv2.dilate(mask, np.ones((9, 9), np.uint8)) - mask).astype(bool)
        ed_inside = gray[ed_frame][inner].mean()
        assert ed_inside < 0.6 * gray[ed_frame][ring].mean()
        assert gray[es_frame][inner].mean() > ed_inside + 3


def test_deterministic_and_extendable(folder, tmp_path):
    again = write_synthetic_echonet(tmp_path / "again", num_videos=8, seed=3, num_workers=2, num_frames=(20, 30))
    for name in ("FileList.csv", "VolumeTracings.csv"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()
    _, rows = read_csv(folder / "FileList.csv")
    for row in rows[:3]:
        a, _ = decode(folder / "Videos" / f"{row[0]}.avi")
        b, _ = decode(again / "Videos" / f"{row[0]}.avi")
        assert np.array_equal(a, b)
    smaller = write_synthetic_echonet(tmp_path / "small", num_videos=5, seed=3, num_workers=1, num_frames=(20, 30))
    assert set(map(tuple, read_csv(smaller / "FileList.csv")[1])) < set(map(tuple, rows))
    other = write_synthetic_echonet(tmp_path / "other", num_videos=2, seed=4, num_workers=1, num_frames=(20, 30))
    assert not {r[0] for r in read_csv(other / "FileList.csv")[1]} & {r[0] for r in rows}


def test_refuses_to_overwrite_and_bad_arguments(folder, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_echonet(folder, num_videos=2, seed=3)
    with pytest.raises(ValueError, match="num_videos"):
        write_synthetic_echonet(tmp_path / "x", num_videos=0)
    with pytest.raises(ValueError, match="parametrisation"):
        write_synthetic_echonet(tmp_path / "y", num_videos=1, parametrisation="no-such-style")
    out = write_synthetic_echonet(tmp_path / "z", num_videos=2, seed=0, num_frames=(10, 12))
    write_synthetic_echonet(out, num_videos=1, seed=1, num_frames=(10, 12), overwrite=True)
    assert len(read_csv(out / "FileList.csv")[1]) == 1 and len(list((out / "Videos").iterdir())) == 1


def test_in_memory_frames_and_shifted_family():
    base = synthetic_frames(12, seed=0, resolution=64)
    assert base.shape == (12, 1, 64, 64) and base.dtype == np.uint8
    assert np.array_equal(base, synthetic_frames(12, seed=0, resolution=64))
    shifted = synthetic_frames(12, seed=0, parametrisation="shifted", resolution=64)
    # The shifted family's wider fan lights up more of the frame.
    assert (shifted > 0).mean() > (base > 0).mean() + 0.1
