"""Oracle for the M3D-Bench evaluation prompts (instruct/src/bench.rs).

Reimplements, line for line, the prompt part of the reference's test datasets: BAAI-DCAI/M3D at commit
63e72005a2304eda74579870239bfc7b04b0edae, Bench/dataset/multi_dataset.py (CapDataset, VQADataset, PosRECDataset,
PosREGDataset, SegDataset, RefSegDataset) and Bench/utils.py (mask2box), as Bench/eval/eval_{caption,vqa,pos,seg}.py
use them. Template lists, term_dict and dataset_info are read from the same bench.json the Rust code embeds.

Only the randomness is replaced: the template indices come from the command line's cases file (the draws the Rust
side recorded), and `random.choice(seq)` returns `seq[index]` for the list it is called on, asserting that the
reference makes exactly the draws the Rust side recorded. Images are not loaded; masks are built with numpy from the
box corners the case gives, so `mask2box` runs on a real array.

Usage: bench_prompts.py BENCH_JSON CASES_JSON  ->  prints a JSON list of {"question", "answer", ...} per case.
"""
import json
import os
import sys

import numpy as np


class FixedChoices:
    """Stands in for the `random` module: `choice(seq)` returns the recorded index of the role `seq` plays."""

    def __init__(self, draws, roles):
        self.draws = {k: v for k, v in draws.items() if v is not None}
        self.roles = roles  # list of (role, list object)
        self.used = []

    def choice(self, seq):
        role = next((r for r, l in self.roles if l is seq), None)
        assert role is not None, "random.choice on a list the case does not describe"
        assert role in self.draws, f"the reference draws a {role}, the Rust side recorded none"
        assert role not in self.used, f"second draw of {role}"
        self.used.append(role)
        return seq[self.draws[role]]

    def finish(self):
        assert sorted(self.used) == sorted(self.draws), f"recorded {sorted(self.draws)}, reference drew {self.used}"
        return self.used


random = None  # set per case, so the reimplemented lines below read as the reference's


class Args:
    def __init__(self, proj_out_num, data_root):
        self.proj_out_num = proj_out_num
        self.data_root = data_root


def mask2box(mask_3d):
    # Bench/utils.py:4-27, with numpy for torch (torch.nonzero(as_tuple=True) == np.nonzero).
    non_zero_indices = np.nonzero(mask_3d)

    min_indices = [np.min(indices) for indices in non_zero_indices]
    max_indices = [np.max(indices) for indices in non_zero_indices]

    min_x = min_indices[0].item()
    min_y = min_indices[1].item()
    min_z = min_indices[2].item()
    max_x = max_indices[0].item()
    max_y = max_indices[1].item()
    max_z = max_indices[2].item()

    X, Y, Z = mask_3d.shape

    min_x_norm = round(min_x / X, 3)
    min_y_norm = round(min_y / Y, 3)
    min_z_norm = round(min_z / Z, 3)

    max_x_norm = round(max_x / X, 3)
    max_y_norm = round(max_y / Y, 3)
    max_z_norm = round(max_z / Z, 3)

    return [min_x_norm, min_y_norm, min_z_norm, max_x_norm, max_y_norm, max_z_norm]


class CapDataset:
    def __init__(self, args, T):
        self.args = args
        self.data_root = args.data_root
        self.image_tokens = "<im_patch>" * args.proj_out_num  # multi_dataset.py:138
        self.caption_prompts = T["Caption_templates"]  # :144

    def roles(self):
        return [("question", self.caption_prompts)]

    def item(self, data):
        # multi_dataset.py:188-196
        text_path = data["text"]
        text_abs_path = os.path.join(self.data_root, text_path)
        with open(text_abs_path, 'r') as text_file:
            raw_text = text_file.read()
        answer = raw_text

        prompt_question = random.choice(self.caption_prompts)

        question = self.image_tokens + prompt_question
        return question, answer, {"question_type": "Caption"}  # :231


class VQADataset:
    def __init__(self, args, close_ended):
        self.args = args
        self.close_ended = close_ended
        self.image_tokens = "<im_patch>" * args.proj_out_num  # multi_dataset.py:248

    def roles(self):
        return []

    def item(self, data):
        # multi_dataset.py:301-311; `data` is the CSV row (pandas Series in the reference, a dict here)
        if self.close_ended:
            question = data["Question"]
            choices = "Choices: A. {} B. {} C. {} D. {}".format(data["Choice A"], data["Choice B"], data["Choice C"], data["Choice D"])
            question = question + ' ' + choices
            answer = "{}. {}".format(data["Answer Choice"], data["Answer"])
        else:
            question = data["Question"]
            answer = str(data["Answer"])

        question = self.image_tokens + ' ' + question
        # :344-345
        return question, answer, {"answer_choice": data["Answer Choice"], "question_type": str(data["Question Type"])}


class _MaskDataset:
    """Shared set-up of PosRECDataset / PosREGDataset / SegDataset (multi_dataset.py:354-425, 525-599, 700-768)."""

    def __init__(self, args, T, tag, description):
        self.args = args
        self.tag = tag
        self.description = description
        self.dataset_info = T["dataset_info"]
        self.image_tokens = "<im_patch>" * args.proj_out_num
        self.box_tokens = ["<bx_start>", "<bx_end>"]

    def load(self, data):
        # :434-453 (PosREG 609-628, Seg 778-797): cls_id from the mask file name, seg as C*D*H*W, vld_cls
        seg_path = data['label']
        cls_id = int(os.path.basename(seg_path).split('_')[1].split('.')[0])
        seg = data["seg"]  # 1*D*H*W
        cls_list = self.dataset_info[self.tag]
        vld_cls = np.nonzero(np.sum(seg, axis=(1, 2, 3)))[0].flatten().tolist()
        return seg, cls_id, cls_list, vld_cls


class PosRECDataset(_MaskDataset):
    def __init__(self, args, T, tag, description):
        super().__init__(args, T, tag, description)
        P = T["PosREC_templates"]
        self.term_dict = T["term_dict"]
        # multi_dataset.py:419-424
        self.cls_questions = P["cls_questions"]
        self.des_questions = P["des_questions"]
        self.cls_answers = P["cls_answers"]
        self.des_answers = P["des_answers"]
        self.cls_no_answers = P["cls_no_answers"]
        self.des_no_answers = P["des_no_answers"]

    def roles(self, cls_name):
        q, a = (self.des_questions, self.des_answers) if self.description else (self.cls_questions, self.cls_answers)
        return [("question", q), ("answer", a), ("term", self.term_dict.get(cls_name))]

    def item(self, data):
        seg, cls_id, cls_list, vld_cls = self.load(data)
        term_dict = self.term_dict
        # multi_dataset.py:455-468 (the positive branch: the Rust side gets non-empty masks only)
        assert vld_cls
        if vld_cls:
            box = mask2box(seg[0])
            if not self.description:
                question_temple = random.choice(self.cls_questions)
                question = question_temple.format(cls_list[cls_id])
                question = self.image_tokens + ' ' + question
                box_text = self.box_tokens[0] + str(box) + self.box_tokens[1]
                answer = random.choice(self.cls_answers).format(box_text)
            else:
                question_temple = random.choice(self.des_questions)
                question = question_temple.format(random.choice(term_dict[cls_list[cls_id]]))
                question = self.image_tokens + ' ' + question
                box_text = self.box_tokens[0] + str(box) + self.box_tokens[1]
                answer = random.choice(self.des_answers).format(cls_list[cls_id], box_text)
        return question, answer, {"question_type": "REC", "class_name": cls_list[cls_id]}  # :514


class PosREGDataset(_MaskDataset):
    def __init__(self, args, T, tag, description):
        super().__init__(args, T, tag, description)
        P = T["PosREG_templates"]
        self.term_dict = T["term_dict"]
        # multi_dataset.py:590-593
        self.cls_questions = P["cls_questions"]
        self.des_questions = P["des_questions"]
        self.cls_answers = P["cls_answers"]
        self.des_answers = P["des_answers"]

    def roles(self, cls_name):
        q, a = (self.des_questions, self.des_answers) if self.description else (self.cls_questions, self.cls_answers)
        return [("question", q), ("answer", a), ("term", self.term_dict.get(cls_name))]

    def item(self, data):
        seg, cls_id, cls_list, vld_cls = self.load(data)
        term_dict = self.term_dict
        # multi_dataset.py:630-643
        assert vld_cls
        if vld_cls:
            box = mask2box(seg[0])
            if not self.description:
                box_text = self.box_tokens[0] + str(box) + self.box_tokens[1]
                question_temple = random.choice(self.cls_questions)
                question = question_temple.format(box_text)
                question = self.image_tokens + ' ' + question
                answer = random.choice(self.cls_answers).format(cls_list[cls_id])
            else:
                box_text = self.box_tokens[0] + str(box) + self.box_tokens[1]
                question_temple = random.choice(self.des_questions)
                question = question_temple.format(box_text)
                question = self.image_tokens + ' ' + question
                answer = random.choice(self.des_answers).format(cls_list[cls_id], random.choice(term_dict[cls_list[cls_id]]))
        return question, answer, {"question_type": "REG", "class_name": cls_list[cls_id]}  # :689


class SegDataset(_MaskDataset):
    def __init__(self, args, T, tag, description):
        super().__init__(args, T, tag, description)
        P = T["Seg_templates"]
        self.term_dict = T["term_dict"]
        # multi_dataset.py:763-768
        self.cls_questions = P["cls_questions"]
        self.des_questions = P["des_questions"]
        self.cls_answers = P["cls_answers"]
        self.des_answers = P["des_answers"]
        self.cls_no_answers = P["cls_no_answers"]
        self.des_no_answers = P["des_no_answers"]

    def roles(self, cls_name):
        q, a = (self.des_questions, self.des_answers) if self.description else (self.cls_questions, self.cls_answers)
        return [("question", q), ("answer", a), ("term", self.term_dict.get(cls_name))]

    def item(self, data):
        seg, cls_id, cls_list, vld_cls = self.load(data)
        term_dict = self.term_dict
        # multi_dataset.py:798-808
        assert vld_cls
        if vld_cls:
            if not self.description:
                question_temple = random.choice(self.cls_questions)
                question = question_temple.format(cls_list[cls_id])
                question = self.image_tokens + ' ' + question
                answer = random.choice(self.cls_answers)
            else:
                question_temple = random.choice(self.des_questions)
                question = question_temple.format(random.choice(term_dict[cls_list[cls_id]]))
                question = self.image_tokens + ' ' + question
                answer = random.choice(self.des_answers).format(cls_list[cls_id])
        return question, answer, {"question_type": "seg", "class_name": cls_list[cls_id]}  # :855


class RefSegDataset:
    def __init__(self, args):
        self.args = args
        self.image_tokens = "<im_patch>" * args.proj_out_num  # multi_dataset.py:872

    def roles(self):
        return []

    def item(self, data):
        # multi_dataset.py:933-936
        question = data["Question"]
        question = self.image_tokens + ' ' + question

        answer = data["Answer"]
        return question, answer, {"question_type": "refseg"}  # :972


def mask_from_corners(case):
    """A 1*D*H*W mask that is one on the box [lo, hi] (inclusive), so mask2box sees exactly those corners."""
    seg = np.zeros([1] + case["shape"], dtype=np.int32)
    (d0, h0, w0), (d1, h1, w1) = case["lo"], case["hi"]
    seg[0, d0:d1 + 1, h0:h1 + 1, w0:w1 + 1] = 1
    return seg


def run_case(case, T):
    global random
    args = Args(case["image_tokens"], case["data_root"])
    c = case["construction"]
    desc = case["family"] == "des"
    if c == "CapDataset":
        ds = CapDataset(args, T)
        roles = ds.roles()
    elif c.startswith("VQADataset"):
        ds = VQADataset(args, close_ended=(c == "VQADataset(close_ended=True)"))
        roles = ds.roles()
    elif c == "RefSegDataset":
        ds = RefSegDataset(args)
        roles = ds.roles()
    else:
        cls = {"PosRECDataset": PosRECDataset, "PosREGDataset": PosREGDataset, "SegDataset": SegDataset}[c.split("(")[0]]
        ds = cls(args, T, case["tag"], desc)
        row = case["row"]
        row["seg"] = mask_from_corners(row)
        roles = ds.roles(T["dataset_info"][case["tag"]][int(row["label"].rsplit("_", 1)[1].split(".")[0])])
    random = FixedChoices(case["draws"], [(r, l) for r, l in roles if l is not None])
    question, answer, extra = ds.item(case["row"])
    order = random.finish()
    if "seg" in case["row"]:
        del case["row"]["seg"]
    out = {"question": question, "answer": answer, "draw_order": order}
    out.update(extra)
    return out


def main():
    bench_json, cases_json = sys.argv[1], sys.argv[2]
    with open(bench_json) as f:
        T = json.load(f)
    with open(cases_json) as f:
        cases = json.load(f)
    print(json.dumps([run_case(c, T) for c in cases]))


if __name__ == "__main__":
    main()
