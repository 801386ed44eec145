"""Report -> VQA pipeline (paper section 2.2): question templates, answer extraction, review, evaluation.

``python -m qa_extraction <command>``: ``vocab`` (top medical words + question-drafting prompt),
``extract`` (one answer per report and question: rules, transformers or openai backend; resumable JSONL),
``to-vqa`` (extraction + manifest -> VQA training file), ``review export|import`` (clinician review),
``evaluate`` (precision / recall / F1 of "present" against labels). Questions come from
``vlsurv.prompts.load_questions``; prompts and cue lexicons are files under prompts/extraction/.
"""
