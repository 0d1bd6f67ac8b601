"""Rows taken verbatim from public files of the projects whose label formats alignflow reads.

Each constant names its source (repository, path, commit). Test rows that follow a format's
documented shape but whose content comes from another public file say so where they are built.
"""

# hiyouga/LLaMA-Factory data/dpo_en_demo.json @ ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30 (rows by index):
# 134 single turn, 23 with a system message, 172 three user turns (sharegpt ranking format)
DPO_EN_DEMO = {134: {'conversations': [{'from': 'human',
                          'value': 'Obtain the result by calculating 6778576-84834150134. Only respond with math '
                                   'and no words.'}],
       'chosen': {'from': 'gpt', 'value': '6778576 - 84834150134 = -84827371558'},
       'rejected': {'from': 'gpt', 'value': '84834150134 - 6778576 = -16666579378'}},
 23: {'conversations': [{'from': 'system',
                         'value': 'You are a helpful assistant, who always provide explanation. Think like you are '
                                  'answering to a five year old.'},
                        {'from': 'human', 'value': 'Write a sentence not in English.'}],
      'chosen': {'from': 'gpt',
                 'value': '"Je mange une pomme." This sentence is in French, and it means "I am eating an apple." '
                          "Imagine you are enjoying a sweet and crunchy apple, but you're telling it to someone "
                          "who speaks French. You would use this sentence to share what you're doing!"},
      'rejected': {'from': 'gpt',
                   'value': 'Ohoy! *giggle* Do you want to hear a sentence in a funny language? *bubble* How about '
                            'this one: "Koala kangaroo cooked kettle korn!" *squeal* That means "The koala and '
                            'kangaroo cooked popcorn" in a silly language! *giggle* Do you like it? *bubble*'}},
 172: {'conversations': [{'from': 'human',
                          'value': 'You are in a race, and you overtake the person in second place. What position '
                                   'are you now in?'},
                         {'from': 'gpt',
                          'value': 'You are now in second place because you have overtaken the person who was '
                                   'previously in second place.'},
                         {'from': 'human',
                          'value': 'In the same race, if you overtake the last runner, what position are you in '
                                   'now?'},
                         {'from': 'gpt',
                          'value': 'This scenario is logically impossible. If you overtake the last runner, it '
                                   'implies that you were behind them, which would mean you were actually the last '
                                   'runner. Therefore, overtaking the last runner in a race is not feasible.'},
                         {'from': 'human',
                          'value': "Can you elaborate on why it's logically impossible to overtake the last runner "
                                   'in a race?'}],
       'chosen': {'from': 'gpt',
                  'value': 'Certainly. The term "overtake" in the context of a race means to pass or go ahead of. '
                           "If you're the last runner, there's no one behind you to overtake. Therefore, the "
                           'scenario of overtaking the last runner is logically impossible because it contradicts '
                           'the definition of "overtake". If you were to pass the last runner, it would mean you '
                           'were initially behind them, making you the last runner. Thus, you cannot overtake the '
                           'last runner without contradicting the terms of the scenario.'},
       'rejected': {'from': 'gpt',
                    'value': "Certainly! When we're talking about a race with a finite number of participants, "
                             'overtaking means to pass another racer. So, to overtake the last runner, you would '
                             'need to be behind them. In this case, you would become the last runner since you '
                             'have now passed the person who was originally in last place. Now, if you were to '
                             'overtake the person who was originally in second place, the person who was in the '
                             'third place would then occupy second place. Consequently, the person who was '
                             'originally in last place moves to the third position. However, there cannot exist a '
                             'situation where you pass the last runner without becoming the last runner yourself. '
                             'This is why overtaking the last runner in a race is logically impossible.'}}}

# hiyouga/LLaMA-Factory data/kto_en_demo.json @ ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30: rows 147 (true), 119 (false)
KTO_EN_DEMO = {147: {'messages': [{'content': 'What is the result of 660-549695? Only respond with math and no words.',
                     'role': 'user'},
                    {'content': '660 - 549695 = -549035', 'role': 'assistant'}],
       'label': True},
 119: {'messages': [{'content': 'Could you work out 2930861750638 plus 52341951985411 for me? Only respond with '
                                'math and no words.',
                     'role': 'user'},
                    {'content': '71600583078871', 'role': 'assistant'}],
       'label': False}}

# hiyouga/LLaMA-Factory data/v1_dpo_demo.jsonl @ ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30, line 3 (index 2)
V1_DPO_DEMO_2 = {'chosen_messages': [{'role': 'system',
                      'content': [{'type': 'text',
                                   'value': 'You are a helpful assistant, who always provide explanation. Think '
                                            'like you are answering to a five year old.'}],
                      'loss_weight': 0.0},
                     {'role': 'user',
                      'content': [{'type': 'text',
                                   'value': 'Concepts: fall, love, relationship, thing\n'
                                            '\n'
                                            'Write a sentence that includes all these words.'}],
                      'loss_weight': 0.0},
                     {'role': 'assistant',
                      'content': [{'type': 'text',
                                   'value': "When you fall in love, it's like a special relationship between two "
                                            "people who really care about each other, and it's a wonderful thing "
                                            'to experience in life.'}],
                      'loss_weight': 1.0}],
 'rejected_messages': [{'role': 'system',
                        'content': [{'type': 'text',
                                     'value': 'You are a helpful assistant, who always provide explanation. Think '
                                              'like you are answering to a five year old.'}],
                        'loss_weight': 0.0},
                       {'role': 'user',
                        'content': [{'type': 'text',
                                     'value': 'Concepts: fall, love, relationship, thing\n'
                                              '\n'
                                              'Write a sentence that includes all these words.'}],
                        'loss_weight': 0.0},
                       {'role': 'assistant',
                        'content': [{'type': 'text',
                                     'value': ' Ooh, let me think! 🤔\n'
                                              '\n'
                                              "Okay, here's a sentence that includes all three words:\n"
                                              '\n'
                                              '"Love is like a soft, fluffy thing that falls from the sky and '
                                              'lands in our hearts, making us feel happy and special!" 🐰💕🐱\n'
                                              '\n'
                                              'Does that make sense, little one? 😊'}],
                        'loss_weight': 1.0}]}

# axolotl-ai-cloud/axolotl tests/prompt_strategies/test_dpo_chat_templates.py @ 067b021c8b87a9e5e380b9173c704cf7340e30f5:
# the fixtures assistant_dataset (chat_template.default), custom_assistant_dataset (its field options:
# field_messages=conversation, field_chosen=better, field_rejected=worse, role=speaker, content=text,
# roles user=human, assistant=agent) and argilla_chat_dataset
AXOLOTL_ASSISTANT = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello"},
                                  {"role": "user", "content": "goodbye"}],
                     "chosen": {"role": "assistant", "content": "goodbye"},
                     "rejected": {"role": "assistant", "content": "party on"}}
AXOLOTL_CUSTOM = {"conversation": [{"speaker": "human", "text": "hello"}, {"speaker": "agent", "text": "hello"},
                                   {"speaker": "human", "text": "goodbye"}],
                  "better": {"speaker": "agent", "text": "goodbye"}, "worse": {"speaker": "agent", "text": "party on"}}
AXOLOTL_ARGILLA_CHAT = {"chosen": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "goodbye"}],
                        "rejected": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "party on"}]}

# argilla-io/distilabel: UltraFeedback task rows. tests/unit/steps/tasks/test_ultrafeedback.py
# @ 70ce54ba5a2cf81a61df4b056eec67002ad69ca1 (test_process_with_simple_aspect: the task's output row) and
# src/distilabel/steps/tasks/ultrafeedback.py @ 6d88a04e4ea11780b205315eb4929beea6c8e101 (docstring example);
# the third has the output of format_output for an answer that was not parsed (ratings [None, None]).
DISTILABEL_ULTRAFEEDBACK = [
    {"instruction": "test", "generations": ["A", "B"], "ratings": [1, 2], "rationales": ["text", "text"],
     "model_name": "ultrafeedback-model"},
    {"instruction": "How much is 2+2?", "generations": ["4", "and a car"], "ratings": [1, 2],
     "rationales": ["explanation for 4", "explanation for and a car"], "model_name": "mistralai/Mistral-7B-Instruct-v0.2"},
    {"instruction": "How much is 2+2?", "generations": ["4", "something weird"], "ratings": [None, None],
     "rationales": [None, None], "model_name": "ultrafeedback-model"},
]
# argilla-io/distilabel tests/unit/steps/tasks/test_prometheus_eval.py @ 4389fbe0046fdbb7fa1f3a8bba08f61aa49a5b0a:
# inputs of test_format_input with the results test_format_output expects ("[RESULT] A" -> "A", "[RESULT] 1" -> 1,
# an unparsed answer -> None)
PROMETHEUS_RELATIVE = [{"instruction": "A", "generations": ["B", "C"], "feedback": "A", "result": "A"},
                       {"instruction": "A", "generations": ["B", "C"], "feedback": "A", "result": "B"},
                       {"instruction": "A", "generations": ["B", "C"], "feedback": None, "result": None}]
PROMETHEUS_ABSOLUTE = [{"instruction": "A", "generation": "B", "feedback": "A", "result": 1},
                       {"instruction": "A", "generation": "C", "feedback": "A", "result": 5},
                       {"instruction": "A", "generation": "D", "feedback": None, "result": None}]

# argilla-io/argilla argilla/tests/unit/test_io/test_generic.py @ 4410c65ab0aac5f84ceb171cbff8cf266bdb40d6
# (test_to_list_flatten): the flat v2 export of one record, with its response statuses (q2: a submitted
# answer and a draft; q1: a submitted answer and one without a status)
ARGILLA_V2_FLAT = {"id": "a", "status": "pending", "_server_id": None, "field": "The field", "key": "value",
                   "q1.responses": ["value", "value"], "q1.responses.users": ["user_a", "user_c"],
                   "q1.responses.status": ["submitted", None], "q2.responses": ["value", "value"],
                   "q2.responses.users": ["user_a", "user_b"], "q2.responses.status": ["submitted", "draft"],
                   "q1.suggestion": "value", "q1.suggestion.score": 0.1, "q1.suggestion.agent": "test",
                   "q2.suggestion": "value", "q2.suggestion.score": 0.9, "q2.suggestion.agent": None}

# LAION-AI/Open-Assistant oasst-data/README.md @ 095ec41ae5276d14480a35485df757072a62b2c1: the message tree
# example ("3. Message Trees"); its root message, replies nested, is what a message export line holds
OASST_README_TREE = {
    "message_tree_id": "14fbb664-a620-45ce-bee4-7c519b16a793", "tree_state": "ready_for_export",
    "prompt": {"message_id": "14fbb664-a620-45ce-bee4-7c519b16a793", "text": "Why can't we divide by 0? (..)",
               "role": "prompter", "lang": "en", "replies": [
                   {"message_id": "894d30b6-56b4-4605-a504-89dd15d4d1c8",
                    "text": "The reason we cannot divide by zero is because (..)", "role": "assistant", "lang": "en",
                    "replies": [{"message_id": "1c9210e9-af9e-4507-abc5-3b3c7bca4dce",
                                 "text": "Can you explain why we created a definition (..)", "role": "prompter",
                                 "lang": "en", "replies": [
                                     {"message_id": "534c7711-afb5-4410-9006-489dc885280e",
                                      "text": "The historical origin of the imaginary (..)", "role": "assistant",
                                      "lang": "en", "replies": []},
                                     {"message_id": "bb791a11-2de2-4e39-9b99-55da5cc730a0",
                                      "text": "The square root of -1, denoted i, was (..)", "role": "assistant",
                                      "lang": "en", "replies": []}]}]},
                   {"message_id": "84d0913b-0fd9-4508-8ef5-205626a7039d",
                    "text": "The reason that the result of a division by zero is (..)", "role": "assistant", "lang": "en",
                    "replies": [{"message_id": "3352725e-f424-4e3b-a627-b6db831bdbaa",
                                 "text": "Math is confusing. Like those weird Irrational (..)", "role": "prompter",
                                 "lang": "en", "replies": [
                                     {"message_id": "f46207ca-3149-46e9-a466-9163d4ce499c",
                                      "text": "Irrational numbers are simply numbers (..)", "role": "assistant",
                                      "lang": "en", "replies": []},
                                     {"message_id": "d63d5610-338b-46b1-b537-9211cdb0ddc6",
                                      "text": "Irrational numbers can be confusing (..)", "role": "assistant",
                                      "lang": "en", "replies": []},
                                     {"message_id": "0ef7430e-314a-4da1-92bd-49a6967dc22f",
                                      "text": "Irrational numbers are real numbers (..)", "role": "assistant",
                                      "lang": "en", "replies": []}]}]}]}}
