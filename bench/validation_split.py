"""A validation split for a VOC-layout set that has only trainval and test: a folder of symlinks to its
Annotations/ and JPEGImages/ whose ImageSets/Main/ holds a seeded train / val split of its trainval.

    python bench/validation_split.py --data ../shared/data/bccd --out /tmp/bccd-val [--val 51] [--seed 2026]
    python bench/validation_split.py --data ../shared/data/aquarium --out /tmp/aquarium-val --group '_MOV-[0-9]+$'
    rcnn run --config photos --data /tmp/bccd-val --set data.train_split=train --set data.test_split=val

Settings are chosen on such a split, never on test (docs/real-photos.md). trainval's ids, as the data
set reader lists them (first column, no repeats, file order), are gathered into groups (--group: ids
that are equal once the pattern's match is removed, e.g. the frames of one video, go to the same side;
without it each id is its own group), the groups are shuffled by Python's random.Random(seed), and
groups go to val in that order until it holds at least --val images.
"""
from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from pipeline.data.voc import VOCDataset
from pipeline.engine.errors import UserError


def grouped(ids: list[str], pattern: str | None) -> list[list[str]]:
    """The ids gathered by their name with `pattern`'s match removed, groups in order of their first id."""
    groups: dict[str, list[str]] = {}
    for image_id in ids:
        groups.setdefault(re.sub(pattern, "", image_id) if pattern else image_id, []).append(image_id)
    return list(groups.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the VOC-layout root with ImageSets/Main/trainval.txt")
    parser.add_argument("--out", type=Path, required=True, help="the new root (must not exist)")
    parser.add_argument("--val", type=int, help="images in val, at least (default: a fifth of trainval)")
    parser.add_argument("--seed", type=int, default=2026, help="the shuffle's seed (default: 2026)")
    parser.add_argument("--group", metavar="REGEX", help="ids equal once this pattern's match is removed stay on one "
                                                         "side (e.g. '_MOV-[0-9]+$': a video's frames); default: none")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out}: already exists; name a new folder")
    try:
        ids = VOCDataset(args.data).listed_ids("trainval")
        groups = grouped(ids, args.group)
    except UserError as error:
        raise SystemExit(str(error)) from None
    except re.error as error:
        raise SystemExit(f"--group {args.group!r}: not a regular expression ({error})") from None
    wanted = round(len(ids) / 5) if args.val is None else args.val
    random.Random(args.seed).shuffle(groups)
    val: list[str] = []
    val_groups = 0
    while len(val) < wanted:
        val += groups.pop(0)
        val_groups += 1
    train = sorted(i for group in groups for i in group)
    (args.out / "ImageSets" / "Main").mkdir(parents=True)
    for folder in ("Annotations", "JPEGImages"):
        (args.out / folder).symlink_to((args.data / folder).resolve())
    for split, split_ids in (("train", train), ("val", sorted(val))):
        (args.out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    print(f"{args.out}: train {len(train)}, val {len(val)} images in {len(groups)} + {val_groups} groups "
          f"(seed {args.seed})")


if __name__ == "__main__":
    main()
