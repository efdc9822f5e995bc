"""The resume-tailoring pipeline: four prompts, each fed the previous step's output.

Register it and run it (from the repository root, so ``examples`` is importable)::

    FLUSHLINE_PIPELINES=examples.resume_tailoring:pipeline python -m app
    curl -s -X POST localhost:8080/api/jobs -d @- <<'JSON'
    {"pipeline": "resume-tailoring",
     "input": {"job_post": "Senior SRE, Kubernetes, on-call...", "resume": "Jane Doe..."}}
    JSON

With no provider configured its prompts go to the built-in simulated source (no network);
set ``FLUSHLINE_LLM_BASE_URL``, ``FLUSHLINE_LLM_MODEL`` and ``FLUSHLINE_LLM_API_KEY`` to run
it against a real model.
"""

from __future__ import annotations

from app.jobs.steps import Input, PromptStep, StepPipeline

__all__ = ["pipeline"]

SYSTEM = "You are an expert career coach and resume writer. Be concrete and concise."

pipeline = StepPipeline(
    name="resume-tailoring",
    description="Tailor a resume to a job post: analyse, summary, bullets, review.",
    inputs=(
        Input("job_post", description="the job advertisement, as text"),
        Input("resume", description="the candidate's current resume, as text"),
    ),
    steps=(
        PromptStep(
            "analyse",
            "Analyse this job post. List the must-have skills, the nice-to-haves and the "
            "words the employer uses for them.\n\nJob post:\n{input.job_post}",
            system=SYSTEM,
            expected_tokens=250,
            insights=("Analyzing the job description...", "Picking out the key skills..."),
        ),
        PromptStep(
            "summary",
            "Using this analysis of the job post:\n{previous}\n\nRewrite the professional "
            "summary of this resume for the role, in 3-4 sentences:\n{input.resume}",
            system=SYSTEM,
            expected_tokens=150,
            insights=("Tailoring professional summary...",),
        ),
        PromptStep(
            "bullets",
            "Here is the tailored summary:\n{previous}\n\nRewrite the experience bullets of "
            "this resume so they lead with what the analysis asks for:\n{steps.analyse}\n\n"
            "Resume:\n{input.resume}",
            system=SYSTEM,
            expected_tokens=400,
            insights=("Rewriting experience bullets...", "Quantifying achievements..."),
        ),
        PromptStep(
            "review",
            "Review this tailored resume section against the job post analysis. Point out "
            "gaps and overstatements, then give the final version.\n\nBullets:\n{previous}"
            "\n\nSummary:\n{steps.summary}\n\nAnalysis:\n{steps.analyse}",
            system=SYSTEM,
            expected_tokens=300,
            insights=("Final review...",),
        ),
    ),
)
