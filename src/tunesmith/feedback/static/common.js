// Shared by the pages: the access token (when the server has one) and JSON calls.
// Model output is only ever placed with textContent (never innerHTML): it is text, not markup.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");

function withToken(path) {
  return TOKEN ? `${path}?token=${encodeURIComponent(TOKEN)}` : path;
}

async function api(path, body) {
  const headers = {};
  if (TOKEN) headers["X-Tunesmith-Token"] = TOKEN;
  const init = { headers, method: body === undefined ? "GET" : "POST" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const error = new Error((data && data.error) || `the server answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
