//! End-to-end tests: the real application on port 0, stand-in platform and LLM servers on
//! 127.0.0.1, driven over HTTP.

mod crash;
mod feishu;
mod helpers;
mod http_surface;
mod lobehub;
mod passive;
mod plugin;
#[path = "../support/raw_http.rs"]
mod raw_http;
mod wechat_mp;
mod wecom;
