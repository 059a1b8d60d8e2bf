//! Yizhan channel for WeCom (企业微信) self-built apps. (in progress)
