"""A multi-turn plugin as ms-swift 3.x users wrote them: swift.plugin's modules."""

from swift.llm.infer.protocol import ChatCompletionResponseChoice
from swift.plugin import multi_turns
from swift.plugin.env import Env, envs
from swift.plugin.multi_turn import MultiTurnScheduler


class OneMore(MultiTurnScheduler):
    """Asks for one more answer, once."""

    def check_finished(self, infer_request, response_choice: "ChatCompletionResponseChoice", current_turn):
        return current_turn >= 2 or super().check_finished(infer_request, response_choice, current_turn)

    def step(self, infer_request, response_choice, current_turn):
        question = infer_request.messages[0]["content"]
        infer_request.messages.append({"role": "user", "content": "One more time: " + question})
        return infer_request, {"asked_again": True}  # swift 3.6's (request, infos)


class Quiet(Env):
    pass


multi_turns["one_more"] = OneMore
envs["quiet"] = Quiet
