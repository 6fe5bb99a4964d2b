"""Data: prompt import, chat templates and loss masks, target caches and the DataModules that stream them."""

from specdec.data.datamodules import CacheBuildSpec, OnlineTargetDataModule, TargetCacheDataModule
from specdec.data.prompts.chat import (
    AssistantTurn,
    ChatTemplateError,
    RenderedConversation,
    TokenizedConversation,
    TokenizeSummary,
    render_conversation,
    tokenize_conversation,
    tokenize_conversations,
)
from specdec.data.prompts.conversations import Conversation, InvalidConversation, Message, Provenance, validate_messages
from specdec.data.prompts.importing import ImportSummary, Rejection, iter_conversations, read_conversations

__all__ = [
    "AssistantTurn",
    "CacheBuildSpec",
    "ChatTemplateError",
    "Conversation",
    "ImportSummary",
    "InvalidConversation",
    "Message",
    "OnlineTargetDataModule",
    "Provenance",
    "Rejection",
    "RenderedConversation",
    "TargetCacheDataModule",
    "TokenizeSummary",
    "TokenizedConversation",
    "iter_conversations",
    "read_conversations",
    "render_conversation",
    "tokenize_conversation",
    "tokenize_conversations",
    "validate_messages",
]
