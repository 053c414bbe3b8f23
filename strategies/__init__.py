"""How a round's updates combine (coordinator side).

``driver`` the round-driver interface (:class:`~fedtune.strategies.driver.RoundDriver`, ``RoundResult``) and
the per-node bookkeeping both drivers share; ``plain`` the in-the-clear round; ``secure`` the SecAgg+ round;
``server_optimizer`` Flower's FedAvg/FedAdam/FedYogi/FedAvgM from the campaign.
"""
