// Conversations kept in this browser (IndexedDB, so attached files stay with them); in memory only when
// the browser offers no IndexedDB (some private modes).

const DB = "glimpse-playground";
const STORE = "conversations";
const memory = new Map();
let opening = null;

function open() {
  if (!opening) {
    opening = new Promise((resolve) => {
      let request;
      try {
        request = indexedDB.open(DB, 1);
      } catch {
        resolve(null);
        return;
      }
      request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id" });
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => resolve(null);
    });
  }
  return opening;
}

async function run(mode, work) {
  const db = await open();
  if (!db) return work(null);
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const request = work(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(request && request.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

/** Every conversation, newest first. */
export async function listConversations() {
  const all = await run("readonly", (s) => (s ? s.getAll() : null));
  return (all || [...memory.values()]).sort((a, b) => b.updated - a.updated);
}

export async function saveConversation(conversation) {
  conversation.updated = Date.now();
  const plain = {
    ...conversation,
    messages: conversation.messages.map((m) => ({
      ...m,
      attachments: (m.attachments || []).map(({ url, dataUrl, ...kept }) => kept),  // live URLs stay out
    })),
  };
  await run("readwrite", (s) => (s ? s.put(plain) : memory.set(plain.id, plain)));
}

export async function deleteConversation(id) {
  await run("readwrite", (s) => (s ? s.delete(id) : memory.delete(id)));
}
