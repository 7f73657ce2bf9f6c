"""A multi-turn plugin written for ms-swift 4.6, as its users write them: swift's imports, subclasses of its
MultiTurnScheduler and Env, registered in swift's multi_turns and envs tables."""

import json
import re
from typing import Dict, List

from swift.infer_engine.protocol import ChatCompletionResponseChoice, RolloutInferRequest
from swift.rollout import Env, MultiTurnScheduler, envs, multi_turns

BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


class AdderToolScheduler(MultiTurnScheduler):
    """Runs OpenAI-style tool calls of an `add` tool; a reply without one ends the trajectory."""

    def check_finished(
        self, infer_request: "RolloutInferRequest", response_choice: "ChatCompletionResponseChoice", current_turn: int
    ) -> bool:
        if not response_choice.message.tool_calls:
            return True
        return super().check_finished(infer_request, response_choice, current_turn)

    def step(
        self, infer_request: "RolloutInferRequest", response_choice: "ChatCompletionResponseChoice", current_turn: int
    ) -> Dict:
        results = []
        for call in response_choice.message.tool_calls:
            args = json.loads(call.function.arguments)
            result = str(int(args["a"]) + int(args["b"]))
            results.append(result)
            infer_request.messages.append(
                {"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": result}
            )
        return {
            "infer_request": infer_request,
            "rollout_infos": {"tool_results": results, "num_tool_turns": current_turn},
        }


class TipsScheduler(MultiTurnScheduler):
    """swift's tips pattern: a wrong boxed answer gets a tip written into the answer, and the model continues it."""

    tips_prompt = " But wait... let me check again."

    async def on_trajectory_start(self, requests: List["RolloutInferRequest"]) -> None:
        for request in requests:
            request.messages = [{"role": "system", "content": "Put the answer in \\boxed{}."}, *request.messages]

    async def on_turn_end(self, infer_request, response_choice, current_turn) -> Dict:
        found = BOXED.findall(infer_request.messages[-1]["content"])
        right = bool(found) and found[-1] == str(infer_request.data_dict["solution"])
        return {"rollout_infos": {"right": right}, **({"done": True} if right else {})}

    def check_finished(self, infer_request, response_choice, current_turn) -> bool:
        if self.tips_prompt in infer_request.messages[-1]["content"]:
            return True  # one tip only
        return super().check_finished(infer_request, response_choice, current_turn)

    def step(self, infer_request, response_choice, current_turn) -> Dict:
        infer_request.messages[-1]["content"] += self.tips_prompt
        return {"infer_request": infer_request}


class GuessEnv(Env):
    """Guess the row's answer: each wrong guess is told so, a right one ends the episode with reward 1."""

    async def reset(self, config: "RolloutInferRequest"):
        self.answer = str(config.data_dict["solution"])
        return config.messages[-1]["content"], {"answer": self.answer}, "You guess numbers."

    async def step(self, action):
        found = BOXED.findall(action[-1]["content"] or "")
        if found and found[-1] == self.answer:
            return None, 1.0, True, {"guess": found[-1]}
        return "Wrong. " + action[1]["content"], -0.5, False, {"guess": found[-1] if found else None}

    async def close(self):
        pass


class RunOwner(MultiTurnScheduler):
    """Takes the whole loop over (swift's full-control mode), which winnow refuses."""

    async def run(self, infer_request, request_config, **kwargs):
        raise AssertionError("never called")


multi_turns["adder_tools"] = AdderToolScheduler
multi_turns["tips"] = TipsScheduler
multi_turns["run_owner"] = RunOwner
envs["guess"] = GuessEnv
