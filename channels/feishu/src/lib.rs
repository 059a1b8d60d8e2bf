//! Yizhan channel for Feishu (飞书) bots. (in progress)
