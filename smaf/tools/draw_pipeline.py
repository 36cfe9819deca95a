"""The pipeline picture of the README (``docs/pipeline.png``), drawn from the run layout so that it stays true.

    python -m smaf.tools.draw_pipeline [--out docs/pipeline.png] [--width 900]

What it reads: the numbered stages, their names and commands from :data:`smaf.run_layout.STAGE_COMMANDS`; what
flows between them from :data:`smaf.run_layout.DEFAULT_INPUTS` and the artifact names beside it; the stage-0
methods from the modules in ``smaf/methods/``. Every step of ``STAGE_COMMANDS`` that is not a numbered stage
(the CRF, and whatever refiner joins it) is drawn in the refiners box, under the stage whose output it reads
(followed through its inputs: a step that reads another step's output sits with that step). Stage 4 (a
segmentation network trained on the pseudo masks) is drawn dashed until ``STAGE_COMMANDS`` has it (a step named
``stage <n> ...``, such as stage 4's inference, is drawn in stage n's box, not with the refiners), as are the
refiners of :data:`PLANNED_REFINERS` that no step names yet.

OpenCV and NumPy only: drawn at twice the size and scaled down (anti-aliased lines and text). A label that does
not fit its box raises ``ValueError``, so a longer name fails here rather than in a cramped picture.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..run_layout import CAM_NPY, CAM_PNG, CRF_PNG, DEFAULT_INPUTS, FINAL, PROTOTYPES, STAGE_COMMANDS

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "docs" / "pipeline.png"
DEFAULT_WIDTH = 900

#: Refiners that plug in after stage 1 or stage 3; drawn as "next" until a step of STAGE_COMMANDS names them.
PLANNED_REFINERS = ("PAR", "random walk", "A2GNN")

#: What each numbered stage does, by config section (the name and command come from STAGE_COMMANDS).
STAGE_TITLES = {
    "train_cls": "initial classifier",
    "fusion": "multi-scale fusion",
    "train_fusion": "self-training",
    "pseudo_masks": "pseudo masks",
    "train_seg": "segmentation network",
}

#: What a stage reads from a folder input ('' artifact in DEFAULT_INPUTS).
FOLDER_INPUT_CONTENTS = {("train_fusion", "fusion_dir"): f"{CAM_NPY}/  {PROTOTYPES}"}

# Colours (BGR).
INK = (40, 40, 40)
GREY_INK = (110, 110, 110)
ARROW = (70, 70, 70)
WHITE = (255, 255, 255)
FILL_DATA = (225, 238, 226)
FILL_STAGE = (246, 228, 208)
FILL_REFINE = (208, 232, 250)
FILL_EVAL = (238, 222, 236)
FILL_PLANNED = (250, 250, 250)

FONT = cv2.FONT_HERSHEY_SIMPLEX
TITLE_PX = 12.0     # cap height of a box title, in output pixels
BODY_PX = 10.0      # cap height of body text and arrow labels
LINE_GAP = 1.75     # line pitch as a multiple of the cap height
PAD = 10            # inner padding of a box
SUPERSAMPLE = 2


# ------------------------------------------------------------------------------------- what to draw
@dataclass
class Step:
    section: str
    name: str        # "stage 1", "the CRF step"
    command: str     # "bash script/gen_fusion.sh"


def parse_stage_commands(stage_commands: dict = STAGE_COMMANDS) -> tuple[dict[int, Step], list[Step]]:
    """Numbered stages ``{number: Step}`` and the other steps (refiners), in the order of ``stage_commands``.
    A step named after a stage (``stage 4 inference``) belongs to that stage's box: see :func:`stage_companions`."""
    stages, others = {}, []
    for section, text in stage_commands.items():
        match = re.fullmatch(r"(.*?)\s*\((.*)\)", text)
        name, command = (match.group(1), match.group(2)) if match else (text, "")
        numbered = re.fullmatch(r"stage (\d+)", name)
        if numbered:
            stages[int(numbered.group(1))] = Step(section, name, command)
        elif not re.match(r"stage \d+ ", name):
            others.append(Step(section, name, command))
    return stages, others


def stage_companions(number: int, stage_commands: dict = STAGE_COMMANDS) -> list[Step]:
    """The steps named ``stage <number> <something>`` (e.g. stage 4's inference), drawn in that stage's box."""
    found = []
    for section, text in stage_commands.items():
        match = re.fullmatch(r"(stage (\d+) .+?)\s*\((.*)\)", text)
        if match and int(match.group(2)) == number:
            found.append(Step(section, match.group(1), match.group(3)))
    return found


def stage_methods(methods_dir: Path = REPO_ROOT / "smaf" / "methods") -> list[str]:
    """The stage-0 method names: the modules of ``smaf/methods/``."""
    return sorted(p.stem for p in methods_dir.glob("*.py") if not p.stem.startswith("_"))


def inputs_of(section: str) -> list[tuple[str, str]]:
    """``(producer section, artifact)`` of every default input of ``section``."""
    return [value for (consumer, _key), value in DEFAULT_INPUTS.items() if consumer == section]


def reading_stage(section: str, stage_sections: set[str], seen: frozenset = frozenset()) -> tuple[str, str]:
    """The numbered stage whose output a step reads (followed through other steps) and the artifact it reads."""
    for producer, artifact in inputs_of(section):
        if producer in stage_sections:
            return producer, artifact
    for producer, _artifact in inputs_of(section):
        if producer not in seen:
            found = reading_stage(producer, stage_sections, seen | {section})
            if found[0]:
                return found
    return "", ""


def flow_label(consumer: str, producer: str) -> str:
    """What flows from ``producer`` into ``consumer``, from the default inputs ("final.pth")."""
    labels = []
    for (section, key), (source, artifact) in DEFAULT_INPUTS.items():
        if section == consumer and source == producer:
            text = FOLDER_INPUT_CONTENTS.get((section, key)) or (artifact + ("/" if "." not in artifact else ""))
            if text not in labels:
                labels.append(text)
    return "  ".join(labels)


def command_exists(command: str) -> bool:
    """Whether the script a ``bash script/<name>.sh`` command runs is in the repository (other commands: True)."""
    match = re.fullmatch(r"bash (script/\S+\.sh)", command)
    return not match or (REPO_ROOT / match.group(1)).is_file()


def short_name(step: Step) -> str:
    name = step.name[4:] if step.name.startswith("the ") else step.name
    return name[0].upper() + name[1:] if name[:1].islower() else name


# ------------------------------------------------------------------------------------- drawing
@dataclass
class Box:
    x: float
    y: float
    w: float
    h: float
    title: str
    lines: list = field(default_factory=list)   # str, or (str, colour)
    fill: tuple = FILL_STAGE
    dashed: bool = False

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h

    @property
    def mid_y(self) -> float:
        return self.y + self.h / 2

    @property
    def mid_x(self) -> float:
        return self.x + self.w / 2


BODY_PITCH = BODY_PX * LINE_GAP       # baseline to baseline of body lines
TITLE_TO_BODY = BODY_PITCH + 4         # title baseline to the first body baseline


def box_height(num_lines: int) -> float:
    """A box holding a title and ``num_lines`` body lines."""
    return 2 * PAD + TITLE_PX + (TITLE_TO_BODY + (num_lines - 1) * BODY_PITCH if num_lines else 0)


class Canvas:
    """An image at ``SUPERSAMPLE`` x the output size; every coordinate and size is in output pixels."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.s = SUPERSAMPLE
        self.image = np.full((int(height * self.s), int(width * self.s), 3), 255, np.uint8)

    def _p(self, x: float, y: float) -> tuple[int, int]:
        return int(round(x * self.s)), int(round(y * self.s))

    @staticmethod
    def _scale(cap_px: float) -> float:
        return cap_px / cv2.getTextSize("H", FONT, 1.0, 1)[0][1]

    def _thickness(self, bold: bool) -> int:
        return 2 * self.s if bold else max(1, int(round(1.2 * self.s)))

    def text_width(self, text: str, cap_px: float = BODY_PX, bold: bool = False) -> float:
        """The drawn width in output pixels (measured at the drawing scale and stroke)."""
        size = cv2.getTextSize(text, FONT, self._scale(cap_px) * self.s, self._thickness(bold))[0][0]
        return size / self.s

    def text(self, x: float, baseline: float, text: str, cap_px: float = BODY_PX, colour=INK, bold=False):
        if x < 0 or x + self.text_width(text, cap_px, bold) > self.width - 2:
            raise ValueError(f"'{text}' runs off the picture ({self.width} px wide): shorten it or move it")
        thickness = self._thickness(bold)
        cv2.putText(self.image, text, self._p(x, baseline), FONT, self._scale(cap_px) * self.s, colour,
                    thickness, cv2.LINE_AA)

    def line(self, a, b, colour=ARROW, width=1.4, dashed=False):
        pa, pb = np.array(a, float), np.array(b, float)
        thickness = max(1, int(round(width * self.s)))
        if not dashed:
            cv2.line(self.image, self._p(*pa), self._p(*pb), colour, thickness, cv2.LINE_AA)
            return
        length = float(np.linalg.norm(pb - pa))
        dash, gap = 6.0, 4.0
        direction = (pb - pa) / max(length, 1e-6)
        t = 0.0
        while t < length:
            end = min(t + dash, length)
            cv2.line(self.image, self._p(*(pa + direction * t)), self._p(*(pa + direction * end)), colour,
                     thickness, cv2.LINE_AA)
            t = end + gap

    def box(self, box: Box):
        top_left, bottom_right = self._p(box.x, box.y), self._p(box.right, box.bottom)
        cv2.rectangle(self.image, top_left, bottom_right, box.fill, -1, cv2.LINE_AA)
        corners = [(box.x, box.y), (box.right, box.y), (box.right, box.bottom), (box.x, box.bottom)]
        for a, b in zip(corners, corners[1:] + corners[:1]):
            self.line(a, b, colour=INK if not box.dashed else GREY_INK, width=1.3, dashed=box.dashed)
        inner = box.w - 2 * PAD
        rows = [(box.title, INK, TITLE_PX, True)] + [
            ((line, INK) if isinstance(line, str) else line) + (BODY_PX, False) for line in box.lines]
        baseline = box.y + PAD + TITLE_PX
        last_baseline = baseline
        for text, colour, cap, bold in rows:
            indent = 12 if text.startswith("  ") else 0
            text = text.strip()
            if self.text_width(text, cap, bold) + indent > inner:
                raise ValueError(f"'{text}' is {self.text_width(text, cap, bold):.0f} px wide; the box "
                                 f"'{box.title}' has {inner:.0f} px: shorten it or widen the box")
            self.text(box.x + PAD + indent, baseline, text, cap, colour, bold)
            last_baseline = baseline
            baseline += TITLE_TO_BODY if bold else BODY_PITCH
        if last_baseline > box.bottom - PAD + 0.5:
            raise ValueError(f"the text of box '{box.title}' is taller than the box")

    def arrow(self, points, label: str = "", where: str = "above", dashed=False, colour=ARROW):
        """A polyline ending in an arrow head; ``label`` above the first horizontal segment, or right/left of
        the first vertical one (``where``)."""
        points = [np.array(p, float) for p in points]
        for a, b in zip(points, points[1:]):
            self.line(a, b, colour, dashed=dashed)
        tip, before = points[-1], points[-2]
        direction = (tip - before) / max(float(np.linalg.norm(tip - before)), 1e-6)
        normal = np.array([-direction[1], direction[0]])
        head = [tip, tip - direction * 9 + normal * 4.5, tip - direction * 9 - normal * 4.5]
        cv2.fillPoly(self.image, [np.array([self._p(*p) for p in head], np.int32)], colour, cv2.LINE_AA)
        if not label:
            return
        a, b = points[0], points[1]
        if where == "above":
            x = (a[0] + b[0]) / 2 - self.text_width(label) / 2
            self.text(x, a[1] - 6, label, colour=INK)
        else:
            y = (a[1] + b[1]) / 2 + BODY_PX / 2
            x = a[0] + 8 if where == "right" else a[0] - 8 - self.text_width(label)
            self.text(x, y, label, colour=INK)

    def to_image(self) -> np.ndarray:
        return cv2.resize(self.image, (self.width, self.height), interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------------------- the picture
def draw_pipeline(width: int = DEFAULT_WIDTH) -> np.ndarray:
    """The pipeline picture as a BGR image ``width`` pixels wide (its layout is made for 900)."""
    stages, steps = parse_stage_commands()
    stage_sections = {step.section for step in stages.values()}
    section_of = {number: step.section for number, step in stages.items()}
    number_of = {step.section: number for number, step in stages.items()}

    # Refiners grouped by the stage whose output they read; the artifact is what they read from it.
    refiner_groups: dict[int, tuple[str, list[Step]]] = {}
    for step in steps:
        producer, artifact = reading_stage(step.section, stage_sections)
        # a step that reads no stage's output (AFA: its own network, from the images) gets its own group, -1
        number = number_of[producer] if producer else -1
        group = refiner_groups.setdefault(number, (artifact, []))
        group[1].append(step)
    named = " ".join(step.name.lower() for step in steps)
    planned = [name for name in PLANNED_REFINERS if name.lower() not in named]

    refiner_lines: list = []
    for number in sorted(refiner_groups):
        artifact, group = refiner_groups[number]
        refiner_lines.append((f"after stage {number}, on {artifact}/:" if number >= 0 else
                              "from the images, a network of its own:", GREY_INK))
        for step in group:
            text = f"  {short_name(step)}: {step.command}"
            refiner_lines.append(text if command_exists(step.command) else (text + " (not yet)", GREY_INK))
    if planned:
        refiner_lines.append(("plug in here next (after stage 1 or 3):", GREY_INK))
        refiner_lines.append(("  " + ", ".join(planned), GREY_INK))
    refiner_lines.append(("each reads a folder of maps or masks and", GREY_INK))
    refiner_lines.append(("writes its own folder (code: smaf/refine/)", GREY_INK))

    margin, gap_x = 20.0, 110.0
    main_w = 450.0
    right_x = margin + main_w + gap_x
    right_w = DEFAULT_WIDTH - margin - right_x
    row_h = box_height(2)
    refine_h = box_height(len(refiner_lines))
    gap_y = max(50.0, (refine_h - 3 * row_h) / 2)
    top = 52.0
    row_y = [top + i * (row_h + gap_y) for i in range(6)]

    def stage_box(number: int, lines: list, row: int, dashed=False, fill=FILL_STAGE, title=None) -> Box:
        step = stages.get(number)
        if title is None:
            title = f"{step.name}: {STAGE_TITLES.get(step.section, step.section)}"
        return Box(margin, row_y[row], main_w, row_h, title, lines, fill, dashed)

    methods = " | ".join(stage_methods())
    init_producer, init_artifact = DEFAULT_INPUTS[("train_fusion", "checkpoint")]
    data = Box(margin, row_y[0], main_w, row_h, "data: images + image labels",
               ["JPEGImages/, cls_labels.npy, split lists (VOC layout)",
                ("SegmentationClass/ masks: only for evaluation", GREY_INK)],
               FILL_DATA)
    saliency = Box(right_x, row_y[0], right_w, row_h, "saliency maps",
                   ["bash script/saliency.sh", ("-> SALImages/ (for the eps method)", GREY_INK)], FILL_DATA)
    boxes = {
        0: stage_box(0, [stages[0].command, f"method: {methods}"], 1),
        1: stage_box(1, [stages[1].command, f"scales x flip -> fused maps, {CAM_PNG}/, prototypes"], 2),
        2: stage_box(2, [stages[2].command,
                         f"student + EMA teacher, from {stages[number_of[init_producer]].name}'s {init_artifact}"],
                     3),
        3: stage_box(3, [stages[3].command, f"masks of the stage-2 model, then the CRF ({CRF_PNG}/)"], 4),
    }
    if 4 in stages:
        commands = "  then  ".join([stages[4].command] + [s.command.split("/")[-1] for s in stage_companions(4)])
        boxes[4] = stage_box(4, [commands, "DeepLab on the pseudo masks; any images: python -m smaf.predict"], 5)
    else:
        boxes[4] = stage_box(4, [("trained on the pseudo masks, then predicts", GREY_INK),
                                 ("plugs in here (not in this version)", GREY_INK)], 5, dashed=True,
                             fill=FILL_PLANNED, title="stage 4: segmentation network")
    refiners = Box(right_x, row_y[2], right_w, row_y[4] + row_h - row_y[2], "refiners", refiner_lines,
                   FILL_REFINE)
    evaluation = Box(right_x, row_y[5], right_w, row_h, "evaluation: python -m smaf.evaluate",
                     ["mIoU of any PNG or CAM .npy folder", ("stages 1 and 3 score their own outputs", GREY_INK)],
                     FILL_EVAL)

    legend_y = row_y[5] + row_h + 30
    height = int(legend_y + 16)
    canvas = Canvas(DEFAULT_WIDTH, height)
    canvas.text(margin, 30, "smaf pipeline", TITLE_PX + 3, INK, bold=True)
    note = "python -m smaf.tools.draw_pipeline (from smaf/run_layout.py)"
    canvas.text(DEFAULT_WIDTH - margin - canvas.text_width(note, BODY_PX - 1), 30, note, BODY_PX - 1, GREY_INK)
    for box in [data, saliency, *boxes.values(), refiners, evaluation]:
        canvas.box(box)

    x_main = margin + main_w / 2
    x_sal = right_x + 40
    canvas.arrow([(data.right, data.mid_y), (saliency.x, saliency.mid_y)], "images")
    canvas.arrow([(x_main, data.bottom), (x_main, boxes[0].y)], "images, image labels", where="right")
    canvas.arrow([(x_sal, saliency.bottom), (x_sal, boxes[0].mid_y), (boxes[0].right, boxes[0].mid_y)],
                 "saliency maps (eps)", where="right")
    for number in (0, 1, 2):
        label = flow_label(section_of[number + 1], section_of[number])
        canvas.arrow([(x_main, boxes[number].bottom), (x_main, boxes[number + 1].y)], label, where="right")
    canvas.arrow([(x_main, boxes[3].bottom), (x_main, boxes[4].y)],
                 f"pseudo masks: {CAM_PNG}/ or {CRF_PNG}/", where="right", dashed=4 not in stages)
    for number in (1, 3):
        artifact = refiner_groups.get(number, ("", []))[0] or (CAM_NPY if number == 1 else CAM_PNG)
        canvas.arrow([(boxes[number].right, boxes[number].mid_y), (refiners.x, boxes[number].mid_y)],
                     f"{artifact}/", dashed=number not in refiner_groups)
    canvas.arrow([(x_sal, refiners.bottom), (x_sal, evaluation.y)], "refined maps, masks", where="right")
    canvas.arrow([(boxes[4].right, boxes[4].mid_y), (evaluation.x, evaluation.mid_y)], "predictions",
                 dashed=4 not in stages)

    # Legend: solid = in this version, dashed = plugs in here.
    canvas.line((margin, legend_y - 4), (margin + 30, legend_y - 4), INK)
    canvas.text(margin + 38, legend_y, "in this version", BODY_PX - 1, GREY_INK)
    canvas.line((margin + 170, legend_y - 4), (margin + 200, legend_y - 4), GREY_INK, dashed=True)
    canvas.text(margin + 208, legend_y, "plugs in here (not in this version)", BODY_PX - 1, GREY_INK)
    canvas.text(margin + 470, legend_y, f"{FINAL}: a trained model   <x>/: a folder of one file per image",
                BODY_PX - 1, GREY_INK)

    image = canvas.to_image()
    if width != DEFAULT_WIDTH:
        image = cv2.resize(image, (width, round(height * width / DEFAULT_WIDTH)), interpolation=cv2.INTER_AREA)
    return image


def write_pipeline_png(out: Path = DEFAULT_OUT, width: int = DEFAULT_WIDTH) -> Path:
    """Draw the picture and write it as a PNG (parent folders made). Returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = draw_pipeline(width)
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError(f"could not encode {out} as PNG")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(encoded.tobytes())
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the README's pipeline picture (docs/pipeline.png) from "
                                                 "smaf/run_layout.py.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="width in pixels (default 900)")
    args = parser.parse_args(argv)
    if args.width < 100:
        print("error: --width must be at least 100 pixels", file=sys.stderr)
        return 2
    out = write_pipeline_png(args.out, args.width)
    height, width = cv2.imread(str(out)).shape[:2]
    print(f"wrote {out} ({width} x {height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
